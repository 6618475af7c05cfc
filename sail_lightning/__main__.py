from sail_lightning.cli import main

main()
