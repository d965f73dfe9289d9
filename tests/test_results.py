"""Result records: plain data only, secrets scrubbed, atomic pickle + JSON twin, safe loading."""

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from tracing.errors import TracingError
from tracing.results import (
    error_line,
    finite_only,
    git_info,
    load_record,
    new_record,
    save_record,
    scrub_args,
    to_plain,
)


def test_git_info_names_the_code_commit():
    info = git_info()
    assert set(info) == {"commit", "dirty"}
    assert info["commit"] is None or len(info["commit"]) == 40


def test_scrub_args_drops_secrets_keeps_settings():
    args = {"token": "hf_abc", "hf_token": "hf_x", "db_password": "p", "api_secret": "s",
            "max_tokens": 100, "report_token": "foo", "save": Path("results"), "alphas": (0.0, 0.5)}
    out = scrub_args(args)
    assert out == {"max_tokens": 100, "report_token": "foo", "save": "results", "alphas": [0.0, 0.5]}
    assert "hf_" not in json.dumps(out)


def test_scrub_args_stringifies_unknown_objects():
    assert scrub_args({"dtype": torch.float32})["dtype"] == "torch.float32"


def test_to_plain_converts_numpy_and_torch():
    out = to_plain({"a": np.float64(1.5), "b": torch.tensor(2), "c": np.arange(3), "d": (np.bool_(True),)})
    assert out == {"a": 1.5, "b": 2, "c": [0, 1, 2], "d": [True]}
    assert type(out["a"]) is float and type(out["b"]) is int and type(out["d"][0]) is bool


def test_new_record_is_plain_and_json_serialisable():
    rec = new_record({"stat": "csu", "token": "hf_secret"})
    assert rec["schema"] == 1 and rec["status"] == "running"
    assert rec["args"] == {"stat": "csu"}
    assert {"python", "torch", "transformers"} <= set(rec["versions"])
    json.dumps(rec)


def test_save_and_load_round_trip_with_json_twin(tmp_path):
    rec = new_record({"stat": "csu"})
    rec.update(status="ok", value=0.9, log10_pvalue=-12345.678, per_layer=[{"layer": 0, "log10_pvalue": -1e4}])
    path = save_record(rec, tmp_path / "sub" / "a__vs__b__csu.pkl")
    assert load_record(path) == rec
    assert json.loads(path.with_suffix(".json").read_text()) == rec
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_save_refuses_non_plain_content_naming_the_key(tmp_path):
    rec = {"status": "ok", "extras": {"layers": [1.0, np.float32(2.0)]}}
    with pytest.raises(TracingError, match=r"\['extras'\]\['layers'\]\[1\].*to_plain"):
        save_record(rec, tmp_path / "r.pkl")
    assert list(tmp_path.iterdir()) == []


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_load_refuses_hostile_pickle_without_running_it(tmp_path):
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"status": "ok", "x": Evil()}))
    with pytest.raises(TracingError, match=r"refusing to load .*evil\.pkl: it contains posix\.system"):
        load_record(path)


def test_load_refuses_non_plain_but_global_free_content(tmp_path):
    path = tmp_path / "set.pkl"
    path.write_bytes(pickle.dumps({"status": "ok", "x": {1, 2}}, protocol=4))
    with pytest.raises(TracingError, match="refusing to load"):
        load_record(path)


def test_load_reports_truncated_and_corrupt_files(tmp_path):
    good = save_record({"status": "ok", "value": 1.0}, tmp_path / "good.pkl")
    truncated = tmp_path / "truncated.pkl"
    truncated.write_bytes(good.read_bytes()[:-5])
    garbage = tmp_path / "garbage.pkl"
    garbage.write_bytes(b"not a pickle at all")
    for path in (truncated, garbage):
        with pytest.raises(TracingError, match="corrupt or truncated"):
            load_record(path)


def test_load_refuses_a_self_referencing_pickle(tmp_path):
    loop: list = []
    loop.append(loop)  # built by pickle opcodes alone, no global needed
    path = tmp_path / "loop.pkl"
    path.write_bytes(pickle.dumps({"status": "ok", "x": loop}))
    with pytest.raises(TracingError, match="refusing to load .*loop.pkl: it nests too deeply"):
        load_record(path)


def test_error_line_is_the_last_non_blank_line():
    assert error_line("Traceback (most recent call last):\n  ...\nValueError: bad\n\n") == "ValueError: bad"
    assert error_line(" \n") is None and error_line(None) is None and error_line("") is None


def test_non_finite_floats_are_written_as_null_with_their_paths(tmp_path):
    rec = {"status": "ok", "value": float("nan"), "extras": {"losses": [1.0, float("inf")]},
           "per_layer": [{"log10_pvalue": -3.0}, {"log10_pvalue": float("-inf")}]}
    path = save_record(rec, tmp_path / "r.pkl")

    def refuse(name):
        raise ValueError(name)
    twin = json.loads(path.with_suffix(".json").read_text(), parse_constant=refuse)  # strict JSON: no bare NaN
    assert twin["value"] is None and twin["per_layer"][1]["log10_pvalue"] is None
    assert twin["extras"]["losses"][1] is None
    assert twin["nonfinite"] == {"value": "nan", "per_layer[1].log10_pvalue": "-inf", "extras.losses[1]": "inf"}
    assert load_record(path) == twin
    assert finite_only(twin) == twin  # idempotent: the paths found earlier are kept
    assert rec["value"] != rec["value"]  # the caller's record is not changed


def test_load_record_reads_older_pickles_that_hold_nan(tmp_path):
    path = tmp_path / "old.pkl"  # written before records were strict: a bare NaN in the pickle
    path.write_bytes(pickle.dumps({"schema": 1, "status": "ok", "log10_pvalue": float("nan"), "per_layer": []},
                                  protocol=4))
    rec = load_record(path)
    assert rec["log10_pvalue"] is None and rec["nonfinite"] == {"log10_pvalue": "nan"} and rec["status"] == "ok"
