"""The comparison with the champion matches classes by name: a champion whose columns are in
another order is reordered, one of other classes is refused before anything is compared."""

from __future__ import annotations

import numpy as np
import pytest

from calibflow.lifecycle.promotion import class_order
from calibflow.errors import GateUndecided, NotComparable


def test_champion_columns_in_another_order_are_matched_to_the_candidates_classes_by_name():
    rng = np.random.default_rng(0)
    candidate_classes = ["cat", "dog", "eel"]
    champion_classes = ["eel", "cat", "dog"]
    probabilities = rng.dirichlet(np.ones(3), size=200)  # columns in the candidate's order
    labels = probabilities.argmax(axis=1)  # indices into the candidate's classes
    # The same predictions as the champion serves them: its column k is champion_classes[k].
    champion_probs = probabilities[:, [candidate_classes.index(name) for name in champion_classes]]
    assert (champion_probs.argmax(axis=1) == labels).mean() < 0.5  # read by position, they look wrong

    order = class_order(candidate_classes, champion_classes, champion_version="7")
    np.testing.assert_array_equal(champion_probs[:, order], probabilities)
    assert (champion_probs[:, order].argmax(axis=1) == labels).all()


@pytest.mark.parametrize(
    "champion_classes, named",
    [
        (["0", "1", "2", "3", "4"], ["'zero'", "'0'"]),  # a class folder renamed
        (["0", "1", "2", "3", "zero", "5"], ["'5'"]),  # a class more
        (["1", "2", "3"], ["'4'", "'zero'"]),  # classes fewer
    ],
)
def test_classes_that_differ_by_name_or_number_are_not_comparable(champion_classes, named):
    candidate_classes = ["1", "2", "3", "4", "zero"]
    with pytest.raises(NotComparable) as refused:
        class_order(candidate_classes, champion_classes, champion_version="3")
    message = str(refused.value)
    assert message.startswith("not comparable: classes differ") and "champion version 3" in message
    assert all(name in message for name in named), message
    # The command line maps both to exit 2 ("could not decide"); Prefect does not retry a LookupError.
    assert isinstance(refused.value, GateUndecided) and isinstance(refused.value, LookupError)
