"""The resumable train loader and the epoch position the DataModule saves."""

from sail_lightning.data.loaders import EpochPosition, ResumableDataLoader


def loader(position: EpochPosition) -> ResumableDataLoader:
    return position.track(ResumableDataLoader(list(range(10)), batch_size=2))


def test_position_saved_mid_epoch_restarts_there_once():
    epoch = [0]
    saved = EpochPosition(lambda: epoch[0])
    batches = iter(loader(saved))
    next(batches), next(batches), next(batches)
    state = saved.state_dict()
    assert state == {"epoch": 0, "batches": 3}

    restored = EpochPosition(lambda: epoch[0])
    built_before_restore = loader(restored)  # as Lightning builds it in epoch 0
    restored.load_state_dict(state)
    assert [b.tolist() for b in built_before_restore] == [[6, 7], [8, 9]]
    assert restored.state_dict() == {"epoch": 0, "batches": 5}
    assert len(list(built_before_restore)) == 5  # the next pass starts at 0


def test_position_of_another_epoch_is_not_applied():
    epoch = [1]
    restored = EpochPosition(lambda: epoch[0])
    restored.load_state_dict({"epoch": 0, "batches": 5})  # an end-of-epoch-0 checkpoint
    assert len(list(loader(restored))) == 5


def test_lightning_loader_state_is_not_applied_twice():
    position = EpochPosition(lambda: 0)
    dl = loader(position)
    dl.load_state_dict({"batches_trained": 3})  # Lightning's restore, in epochs >= 1
    assert len(list(dl)) == 5
