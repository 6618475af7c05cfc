"""W&B: offline runs of the CLI, the samples table, and the sweep files' contract with the CLI.

Nothing here contacts a server: runs use ``WANDB_MODE=offline`` and are read back from the
run folder (its ``.wandb`` transaction log and ``files/media``); sweeps need a server, so
their contract is tested instead: a sweep's parameters, expanded into the ``--a.b=value``
arguments that ``wandb agent`` puts in place of ``${args}``, parse with the CLI and land
where they should in the config.
"""

import json
import struct
from types import SimpleNamespace
from unittest.mock import MagicMock

import pytest
import wandb
import yaml
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from wandb.proto import wandb_internal_pb2

from sail_lightning.cli import main
from sail_lightning.common import Route
from sail_lightning.wandb_samples import COLUMNS, GenerationSamplesCallback, sample_rows
from tests.conftest import CONFIGS, REPO

QUICK = str(CONFIGS / "quickstart.yaml")
WANDB = str(CONFIGS / "logger" / "wandb.yaml")
SAMPLES = "--trainer.callbacks+=sail_lightning.wandb_samples.GenerationSamplesCallback"
SWEEPS = sorted(p.name for p in (CONFIGS / "sweeps").glob("*.yaml"))


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two offline CLI runs in one save_dir, as a user runs them one after the other: the
    first with the samples table (2 epochs: rounds 0 and 1), the second with another beta.

    Every folder W&B writes lies under a temporary folder; no run is left open after.
    Returns the save_dir.
    """
    tmp = tmp_path_factory.mktemp("wandb")
    save, home = tmp / "logs", tmp / "wandb_home"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        mp.setenv("WANDB_DISABLE_CODE", "true")
        for var, sub in (("WANDB_DIR", "dir"), ("WANDB_CACHE_DIR", "cache"),
                         ("WANDB_CONFIG_DIR", "config"), ("WANDB_DATA_DIR", "data"),
                         ("WANDB_ARTIFACT_DIR", "artifacts")):
            mp.setenv(var, str(home / sub))
        for var in ("WANDB_API_KEY", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_RUN_ID",
                    "WANDB_SWEEP_ID", "WANDB_RUN_GROUP", "WANDB_TAGS", "WANDB_NAME"):
            mp.delenv(var, raising=False)
        try:
            fit(["-c", QUICK, "-c", WANDB, *small(save, epochs=2), SAMPLES,
                 "--trainer.callbacks.init_args.n=3"])
            fit(["-c", QUICK, "-c", WANDB, *small(save, epochs=1), "--model.beta=0.2"])
        finally:
            wandb.teardown()
    return save


def small(save_dir, epochs):
    return [f"--trainer.default_root_dir={save_dir}",
            f"--trainer.logger.init_args.save_dir={save_dir}",
            f"--trainer.max_epochs={epochs}", f"--trainer.limit_train_batches={BATCHES}",
            "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false",
            "--trainer.log_every_n_steps=1", "--data.num_synthetic_pairs=100"]


BATCHES = 2


def fit(args):
    """One CLI run. WandbLogger never finishes its run, and a second WandbLogger in this
    process would reuse it: finish it, as the end of a ``sail-lightning`` process does."""
    try:
        main(["fit", *args])
    finally:
        wandb.finish()


# -- reading an offline run ------------------------------------------------------------------


def _records(path):
    """The protobuf records of a ``.wandb`` file: a 7-byte W&B header, then a LevelDB log
    (32 KiB blocks of chunks: crc32 u32, length u16, type u8 full/first/middle/last)."""
    raw = path.read_bytes()
    assert raw[:4] == b":W&B"
    block, pos, parts = 32768, 7, b""
    while pos + 7 <= len(raw):
        left = block - pos % block
        if left < 7:  # block trailer: zero padding
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        data, pos = raw[pos + 7 : pos + 7 + n], pos + 7 + n
        if kind in (1, 2):
            parts = data
        elif kind in (3, 4):
            parts += data
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            yield record


def read_run(run_dir):
    """An offline run folder's run record, final summary and config, from its .wandb file."""
    (path,) = run_dir.glob("run-*.wandb")
    run, summary, config = None, {}, {}
    for r in _records(path):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            run = r.run
        elif kind == "summary":
            for item in r.summary.update:
                summary["/".join(item.nested_key) or item.key] = json.loads(item.value_json)
        elif kind == "config":
            for item in r.config.update:
                config[item.key] = json.loads(item.value_json)
    return run, summary, config


def run_dirs(save_dir):
    """The offline run folders in save_dir, in the order the runs started."""
    dirs = list((save_dir / "wandb").glob("offline-run-*"))
    return sorted(dirs, key=lambda d: read_run(d)[0].start_time.ToNanoseconds())


# -- runs ------------------------------------------------------------------------------------


def test_offline_run_logs_metrics_and_config(two_runs):
    first, _ = run_dirs(two_runs)
    run, summary, config = read_run(first)
    assert run.project == "sail-lightning" and run.run_group == "quickstart"
    assert list(run.tags) == ["synthetic", "tiny"] and run.display_name != "csv"
    assert 0.0 <= summary["val/rewards/accuracies"] <= 1.0
    assert summary["gen/round"] == 1.0 and "train/loss" in summary
    assert summary["trainer/global_step"] == 2 * BATCHES - 1  # the last step logged
    # Lightning logs the module's and the DataModule's hyperparameters as wandb.config.
    assert config["beta"] == 0.1 and config["mix_pr"] == 0.3 and config["coef_pr"] == 0.3
    # Every sweep optimises a metric the runs log.
    for name in SWEEPS:
        assert load_sweep(name)["metric"]["name"] in summary, name


def test_second_run_in_the_same_save_dir_does_not_clash(two_runs):
    first, second = run_dirs(two_runs)  # one folder per run, in one save_dir
    run, _, _ = read_run(first)
    run2, summary2, config2 = read_run(second)
    assert run2.run_id != run.run_id and config2["beta"] == 0.2
    assert summary2["gen/round"] == 0.0 and "val/rewards/accuracies" in summary2
    # One folder per run, save_dir/<project>/<run id>/, holding its config.yaml, checkpoints
    # and online rounds (2 rounds, then 1): nothing of the first run overwritten.
    assert not (two_runs / "config.yaml").exists()
    for r, beta, n in ((run, 0.1, 2), (run2, 0.2, 1)):
        folder = two_runs / "sail-lightning" / r.run_id
        saved = yaml.safe_load((folder / "config.yaml").read_text())
        assert saved["trainer"]["logger"]["class_path"].endswith("WandbLogger")
        assert saved["model"]["beta"] == beta
        assert list((folder / "checkpoints").glob("*.ckpt"))
        assert len(list((folder / "rounds").glob("round_*.jsonl"))) == n
        assert list((folder / "eval").glob("epoch_*.jsonl"))  # the evaluation's responses


def test_samples_table_logged_once_per_round(two_runs):
    first, second = run_dirs(two_runs)
    _, summary, _ = read_run(first)
    assert summary["gen/samples/_type"] == "table-file"
    assert summary["gen/samples/nrows"] == 3 and summary["gen/samples/ncols"] == len(COLUMNS)
    tables = sorted((first / "files" / "media" / "table" / "gen").glob("samples_*.table.json"),
                    key=lambda p: int(p.name.split("_")[1]))
    assert len(tables) == 2  # rounds 0 and 1 of a 2-epoch run, each logged once
    for round_index, path in enumerate(tables):
        table = json.loads(path.read_text())
        assert table["columns"] == COLUMNS and len(table["data"]) == 3
        for row in table["data"]:
            assert row[0] == round_index and row[1] == "pr"
            assert all(isinstance(v, str) for v in row[2:5])
            assert isinstance(row[5], float) and isinstance(row[6], float)
    # Without the callback (the second run), no table.
    assert "gen/samples/_type" not in read_run(second)[1]
    assert not (second / "files" / "media").exists()


def print_config(capsys, args):
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["fit", *args, "--print_config"])
    return yaml.safe_load(capsys.readouterr().out)


def test_callbacks_append_keeps_the_generation_callback(capsys):
    base = print_config(capsys, ["-c", QUICK, "-c", WANDB])
    cfg = print_config(capsys, ["-c", QUICK, "-c", WANDB, SAMPLES])
    paths = [c["class_path"] for c in cfg["trainer"]["callbacks"]]
    assert paths == [c["class_path"] for c in base["trainer"]["callbacks"]] + [
        "sail_lightning.wandb_samples.GenerationSamplesCallback"]
    assert "sail_lightning.callbacks.PairGenerationCallback" in paths
    # The W&B config replaces the CSV logger (and drops its `name: csv`).
    logger = cfg["trainer"]["logger"]
    assert logger["class_path"] == "lightning.pytorch.loggers.WandbLogger"
    init = logger["init_args"]
    assert init["name"] is None and init["save_dir"] == "runs/wandb"
    assert init["project"] == "sail-lightning" and init["log_model"] is False
    assert init["group"] == "quickstart" and init["tags"] == ["synthetic", "tiny"]


# -- the callback alone ----------------------------------------------------------------------


def pair(i, route=Route.PR, scores=True):
    return SimpleNamespace(round=2, route=int(route), prompt=f"p{i}", chosen=f"c{i}",
                           rejected=f"r{i}",
                           scores={"chosen": 1.0, "rejected": 0.5} if scores else None)


def test_sample_rows_spread_over_the_round():
    pairs = [pair(i, Route.PP) for i in range(5)] + [pair(i, Route.PR) for i in range(5, 10)]
    rows = sample_rows(pairs, 4)
    assert [r[2] for r in rows] == ["p0", "p2", "p5", "p7"]
    assert [r[1] for r in rows] == ["pp", "pp", "pr", "pr"]
    assert rows[0] == [2, "pp", "p0", "c0", "r0", 1.0, 0.5]
    assert len(sample_rows(pairs[:2], 8)) == 2
    assert sample_rows([pair(0, scores=False)], 8)[0][5:] == [None, None]


def fake_trainer(loggers, rank=0, current_round=0, pairs=None):
    pool = SimpleNamespace(current_round=current_round,
                           pairs=[pair(i) for i in range(3)] if pairs is None else pairs)
    dm = SimpleNamespace(pool=pool)
    return SimpleNamespace(datamodule=dm, loggers=loggers, is_global_zero=rank == 0,
                           global_step=5)


def test_callback_logs_each_new_round_once_on_rank_zero_only():
    cb = GenerationSamplesCallback(n=2)
    wb = MagicMock(spec=WandbLogger)
    trainer = fake_trainer([CSVLogger("."), wb])
    cb.on_train_epoch_start(trainer, None)
    cb.on_train_epoch_start(trainer, None)  # same round: nothing new
    wb.log_table.assert_called_once()
    args, kwargs = wb.log_table.call_args
    assert args == ("gen/samples",) and kwargs["columns"] == COLUMNS
    assert len(kwargs["data"]) == 2 and kwargs["step"] == 5
    trainer.datamodule.pool.current_round = 1
    cb.on_train_epoch_start(trainer, None)
    assert wb.log_table.call_count == 2

    other = MagicMock(spec=WandbLogger)
    GenerationSamplesCallback().on_train_epoch_start(fake_trainer([other], rank=1), None)
    other.log_table.assert_not_called()


def test_callback_is_a_no_op_without_wandb_or_rounds():
    cb = GenerationSamplesCallback()
    cb.on_train_epoch_start(fake_trainer([CSVLogger(".")]), None)  # no WandbLogger
    wb = MagicMock(spec=WandbLogger)
    cb.on_train_epoch_start(fake_trainer([wb], current_round=-1, pairs=[]), None)  # offline
    cb.on_train_epoch_start(SimpleNamespace(datamodule=None, loggers=[wb], is_global_zero=True,
                                            global_step=0), None)
    wb.log_table.assert_not_called()
    with pytest.raises(ValueError, match="n must be"):
        GenerationSamplesCallback(n=0)


# -- sweeps ----------------------------------------------------------------------------------


def load_sweep(name):
    return yaml.safe_load((CONFIGS / "sweeps" / name).read_text())


def test_there_are_sweeps_for_sail_pr_and_sail_dp():
    assert {"sail_pr.yaml", "sail_dp.yaml"} <= set(SWEEPS)


@pytest.mark.parametrize("name", SWEEPS)
def test_sweep_file_is_well_formed(name):
    sweep = load_sweep(name)
    assert sweep["method"] in ("grid", "random", "bayes")
    assert sweep["metric"] == {"name": "val/rewards/accuracies", "goal": "maximize"}
    assert sweep["program"] == "sail-lightning"
    command = sweep["command"]
    assert command[:3] == ["${env}", "sail-lightning", "fit"] and command[-1] == "${args}"
    assert "configs/logger/wandb.yaml" in command
    for param, spec in sweep["parameters"].items():
        assert "values" in spec or {"min", "max"} <= set(spec), param
        if sweep["method"] == "grid":
            assert "values" in spec, f"{param}: grid sweeps need values"
        if "min" in spec:
            assert spec["min"] < spec["max"], param
    if sweep["method"] != "grid":
        assert sweep.get("run_cap"), "bayes and random sweeps run until stopped: set run_cap"


def agent_command(sweep, values):
    """The command line ``wandb agent`` runs for one run: ``${args}`` and the other macros
    expanded by wandb's own code, as in ``wandb_agent.Agent._command_run``."""
    from wandb.sdk.launch.sweeps import utils as sweep_utils

    sweep_vars = sweep_utils.create_sweep_command_args(
        {"args": {k: {"value": v} for k, v in values.items()}})
    sweep_vars.update(env=["/usr/bin/env"], program=[sweep["program"]], interpreter=["python"])
    out = []
    for chunk in sweep_utils.create_sweep_command(list(sweep["command"])):
        chunk = str(chunk)
        if chunk.startswith("${") and chunk.endswith("}"):
            out += sweep_vars.get(chunk[2:-1]) or []
        else:
            out.append(chunk)
    return out


def pick(spec, end):
    """One value of a sweep parameter: the first / last of ``values``, or ``min`` / ``max``."""
    if "values" in spec:
        return spec["values"][0 if end == "first" else -1]
    return spec["min" if end == "first" else "max"]


def nested(cfg, dotted):
    for key in dotted.split("."):
        assert isinstance(cfg, dict) and key in cfg, f"{dotted}: not a CLI option"
        cfg = cfg[key]
    return cfg


@pytest.mark.parametrize("end", ["first", "last"])
@pytest.mark.parametrize("name", SWEEPS)
def test_sweep_args_parse_and_land_in_the_config(name, end, capsys, monkeypatch):
    monkeypatch.chdir(REPO)  # the agent runs from the repo root: the -c paths are relative
    sweep = load_sweep(name)
    values = {param: pick(spec, end) for param, spec in sweep["parameters"].items()}
    command = agent_command(sweep, values)
    assert command[:3] == ["/usr/bin/env", "sail-lightning", "fit"]
    expanded = command[len(sweep["command"]) - 1 :]
    assert expanded == [f"--{k}={v}" for k, v in values.items()]
    cfg = print_config(capsys, command[3:])
    for param, value in values.items():
        assert nested(cfg, param) == value, param
    assert cfg["trainer"]["logger"]["class_path"] == "lightning.pytorch.loggers.WandbLogger"
    assert cfg["trainer"]["logger"]["init_args"]["group"] == f"sweep-{name[:-5]}"
    assert sum(cfg["data"][f"mix_{r}"] for r in ("dp", "pp", "pr")) <= 1.0
    paths = [c["class_path"] for c in cfg["trainer"]["callbacks"]]
    if cfg["data"]["mix_pp"] + cfg["data"]["mix_pr"] > 0:
        assert "sail_lightning.callbacks.PairGenerationCallback" in paths
    if "--trainer.callbacks+=" in " ".join(sweep["command"]):
        assert paths[-1] == "sail_lightning.wandb_samples.GenerationSamplesCallback"
