import pytest

from helip.trainer.app.cadence import Cadence, Due


def dues(cadence: Cadence) -> dict[int, Due]:
    return {done: cadence.due(done) for done in range(1, cadence.total + 1) if cadence.due(done) != Due()}


def test_intervals_fall_due_on_their_multiples_but_the_last_step_only_exports_its_epoch():
    cadence = Cadence(total=12, checkpoint_every=4, epoch=6, eval_every=3, zeroshot_every=6)
    assert dues(cadence) == {
        3: Due(periodic_eval=True),
        4: Due(checkpoint=True),
        6: Due(epoch=1, periodic_eval=True, zero_shot_eval=True),
        8: Due(checkpoint=True),
        9: Due(periodic_eval=True),
        12: Due(epoch=2),  # the end of the run saves and evaluates the final model itself
    }
    assert cadence.due(6).evaluate and not cadence.due(4).evaluate


def test_zero_intervals_never_fall_due():
    cadence = Cadence(total=10, checkpoint_every=0, epoch=5, eval_every=0, zeroshot_every=0)
    assert dues(cadence) == {5: Due(epoch=1), 10: Due(epoch=2)}


def test_of_run_converts_optimizer_steps_and_epochs_into_micro_steps():
    cadence = Cadence.of_run(40, accumulation=4, epoch=10, checkpoint_every=2, eval_every=5, zeroshot_epochs=3)
    assert cadence == Cadence(total=40, checkpoint_every=8, epoch=10, eval_every=20, zeroshot_every=30)
    assert cadence.due(30) == Due(epoch=3, zero_shot_eval=True)


@pytest.mark.parametrize(
    "field, value", [("epoch", 0), ("checkpoint_every", -1), ("eval_every", -2), ("zeroshot_every", -1), ("total", -1)]
)
def test_bad_intervals_name_the_field(field, value):
    settings = dict(total=10, checkpoint_every=1, epoch=5, eval_every=1, zeroshot_every=1)
    with pytest.raises(ValueError, match=f"Cadence.{field}"):
        Cadence(**{**settings, field: value})
