"""generate.py: seeded samples per model into <save>/<safe name>_gentext.json, read by --dataset generated."""

import json

from tracing.generate import generate_for, main
from tracing.naming import generated_path


def test_writes_the_schema_the_generated_dataset_reads(tmp_path, model_dir):
    path, written = generate_for(model_dir, tmp_path, n=5, max_new_tokens=6, seed=3, batch_size=2,
                                 device="cpu", progress=False)
    assert written and path == generated_path(tmp_path, model_dir)
    data = json.loads(path.read_text())
    assert data["model_id"] == model_dir and data["seed"] == 3 and data["max_new_tokens"] == 6
    assert len(data["texts"]) == 5 and all(isinstance(t, str) and t for t in data["texts"])
    again, written = generate_for(model_dir, tmp_path, n=5, max_new_tokens=6, seed=3, device="cpu")
    assert not written and again == path  # existing file kept
    forced, _ = generate_for(model_dir, tmp_path / "2", n=5, max_new_tokens=6, seed=3, batch_size=2,
                             device="cpu", progress=False)
    assert json.loads(forced.read_text())["texts"] == data["texts"]  # seeded: same texts


def test_missing_model_is_a_one_line_error(tmp_path, capsys):
    assert main(["--model_id", str(tmp_path / "nope"), "--save", str(tmp_path)]) == 2
    assert "error:" in capsys.readouterr().err


def test_bad_sizes_are_refused_before_loading(tmp_path, capsys):
    assert main(["--model_id", "any", "--save", str(tmp_path), "--batch_size", "0"]) == 2
    assert "--batch_size must be positive" in capsys.readouterr().err
