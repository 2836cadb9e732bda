"""`calibflow predict` prints one line per image with a fixed number of tab-separated fields,
whatever its class names and paths hold: control and bidi characters come out as visible escapes."""

from __future__ import annotations

import pytest

from calibflow.lifecycle.reproduce import Prediction
from cli.options import printable
from cli.registry import prediction_line

HOSTILE = [
    "cat\ndog",  # a second line
    "cat\tdog",  # a second field
    "cat\r0.9999",  # a carriage return overwriting what a terminal shows
    "\u202egod",  # right-to-left override: reads as "dog"
    "a\u2066b\u2069",  # bidi isolates
    "zero\u200bwidth",
    "line\u2028separator",
    "nul\x00bell\x07esc\x1b[31m",
    "undecodable\udcff",  # a file name's byte that is not UTF-8
]


@pytest.mark.parametrize(
    "text, shown",
    [
        ("cat\ndog", "cat\\ndog"),
        ("cat\tdog", "cat\\tdog"),
        ("\u202egod", "\\u202egod"),
        ("nul\x00esc\x1b", "nul\\x00esc\\x1b"),
        ("tag\U000e0041", "tag\\U000e0041"),
        ("a\\nb", "a\\\\nb"),  # a backslash is escaped, so an escape always means the character
        ("chat noir, 猫 – Ünïcode ok", "chat noir, 猫 – Ünïcode ok"),
        ("data/tiny/3/img 01.png", "data/tiny/3/img 01.png"),
    ],
)
def test_printable_escapes_what_is_invisible_or_breaks_a_line(text, shown):
    assert printable(text) == shown


@pytest.mark.parametrize("name", HOSTILE)
def test_printable_leaves_nothing_that_moves_or_hides_text(name):
    import unicodedata

    shown = printable(name)
    assert [c for c in shown if unicodedata.category(c) in {"Cc", "Cf", "Zl", "Zp", "Cs"}] == []
    shown.encode("utf-8")  # printable on any UTF-8 terminal: no lone surrogate left


@pytest.mark.parametrize("name", HOSTILE)
def test_each_prediction_is_one_line_of_the_expected_fields(name):
    prediction = Prediction(
        path=f"images/{name}.png",
        label=name,
        probability=0.75,
        decisions={"positive": name, "prediction_set": [name, "plain"]},
    )
    line = prediction_line(prediction)
    assert line.splitlines() == [line]
    fields = line.split("\t")
    assert fields == [
        f"images/{printable(name)}.png",
        printable(name),
        "0.7500",
        f"positive={printable(name)}",
        f"prediction_set={{{printable(name)},plain}}",
    ]
    assert "\u202e" not in line and "\u2066" not in line


def test_an_ordinary_prediction_prints_as_before():
    prediction = Prediction(path="data/tiny/3/0001.png", label="3", probability=0.98765, decisions={})
    assert prediction_line(prediction) == "data/tiny/3/0001.png\t3\t0.9877"
    abstained = Prediction(path="x.png", label="abstain", probability=0.4, decisions={"prediction_set": ["1", "7"]})
    assert prediction_line(abstained) == "x.png\tabstain\t0.4000\tprediction_set={1,7}"


def test_predict_prints_one_line_per_image_for_hostile_names(tmp_path, monkeypatch, capsys):
    """The command itself, with the served model's predictions faked: no registry, no training."""
    import argparse

    from calibflow.lifecycle import reproduce
    from calibflow.tracking import store
    from cli import registry

    images = []
    for number, name in enumerate(HOSTILE):
        # a file name holds no NUL; a lone surrogate is a byte that is not UTF-8, which the name keeps
        path = tmp_path / f"{number}{name.replace(chr(0), '0')}.png"
        path.write_bytes(b"not read: the predictions are faked")
        images.append(str(path))

    def fake_predictions(model_uri, paths):
        return [
            Prediction(path, HOSTILE[n], 0.5, {"prediction_set": [HOSTILE[n], "plain"]}) for n, path in enumerate(paths)
        ]

    monkeypatch.setattr(reproduce, "predict_files", fake_predictions)
    monkeypatch.setattr(store, "configure_tracking", lambda repo: "sqlite:///unused.db")
    args = argparse.Namespace(model="models:/m@champion", repo=str(tmp_path), images=images)
    assert registry.predict(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(images)
    assert [len(line.split("\t")) for line in lines] == [4] * len(images)
    assert [line.split("\t")[0] for line in lines] == [printable(path) for path in images]
