"""benchmarks/train_time_calibration.py without training: the recipe's subset is cut from the
archive in file-name order, and the table goes between the document's markers, nowhere else."""

from __future__ import annotations

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


def test_table_is_written_between_the_markers_only(tmp_path, monkeypatch):
    bench = load_benchmark()
    doc = tmp_path / "doc.md"
    doc.write_text(f"# title\n\nbefore\n\n{bench.BEGIN}\nold table\n{bench.END}\n\nafter\n")
    monkeypatch.setattr(bench, "DOC", doc)
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
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{bench.SHORT_BEGIN}\nold\n{bench.SHORT_END}\nrest\n")
    bench.write_doc([row], "python benchmarks/train_time_calibration.py", readme=readme)
    assert readme.read_text() == (
        f"intro\n{bench.SHORT_BEGIN}\n{bench.summary_table([row])}\n{bench.SHORT_END}\nrest\n"
    )
    assert "| cross-entropy | 0.500 | 10.00% -> 1.00% (1.50) | 4.35% -> 1.35% (2.5) |" in readme.read_text()
    text = doc.read_text()
    assert "old table" not in text and text.startswith("# title\n\nbefore\n") and text.endswith("\nafter\n")
    assert "| cross-entropy | 0.500 | 10.00% ± 0.77 | 1.00% ± 0.77 |" in text
