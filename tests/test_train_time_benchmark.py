"""benchmarks/train_time_calibration.py without training: the recipe's subset is cut from the
archive in file-name order, and the results file holds the summary beside Mukhoti et al.'s table
and the full table, under the command that wrote them."""

from __future__ import annotations

import argparse
import importlib.util
import io
import sys
import tarfile
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "train_time_calibration.py"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("train_time_calibration", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_time_calibration"] = module
    spec.loader.exec_module(module)
    return module


def test_subset_takes_the_first_files_of_each_training_class(tmp_path):
    bench = load_benchmark()
    archive = tmp_path / "a.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for split in ("train", "test"):
            for name in ("cat", "dog"):
                for index in (3, 0, 2, 1):  # stored out of order
                    data = f"{split}/{name}/{index}".encode()
                    info = tarfile.TarInfo(f"{split}/{name}/{index:04d}.jpg")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    out = bench.build_subset(archive, tmp_path / "subset", per_class=2)
    assert sorted(str(p.relative_to(out)) for p in out.glob("*/*")) == [
        "cat/0000.jpg",
        "cat/0001.jpg",
        "dog/0000.jpg",
        "dog/0001.jpg",
    ]
    assert (out / "dog" / "0001.jpg").read_bytes() == b"train/dog/1"


def test_results_hold_the_summary_beside_mukhoti_and_the_full_table(tmp_path):
    bench = load_benchmark()
    metrics = {
        "accuracy": 0.5,
        "nll": 1.4,
        "brier": 0.6,
        "ece": 0.1,
        "mce": 0.2,
        "ece_low": 0.09,
        "ece_high": 0.12,
        "smooth_ece": 0.1,
    }
    row = {
        "method": "cross_entropy",
        "n_train": 10,
        "n_calibration": 5,
        "n_test": 7,
        "temperatures": [1.5],
        "final_train_loss": 0.2,
        "wall_seconds": 3.0,
        "predict_ms_per_image": 0.5,
        "before": metrics,
        "after": {**metrics, "ece": 0.01},
    }
    args = argparse.Namespace(smoke=False)
    path = bench._common.publish("train_time_calibration", "T", bench.results_markdown([row]), args, tmp_path, [])
    text = path.read_text()
    assert path == tmp_path / "train_time_calibration.md"
    assert "Written by `python benchmarks/train_time_calibration.py` on " in text
    assert "10 training, 5 calibration and 7 test images" in text
    summary = "| cross-entropy | 0.500 | 10.00% -> 1.00% (1.50) | 4.35% -> 1.35% (2.5) |"
    full = "| cross-entropy | 0.500 | 10.00% ± 0.77 | 1.00% ± 0.77 |"
    assert summary in text and full in text and text.index(summary) < text.index(full)
