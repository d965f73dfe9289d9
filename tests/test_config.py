"""Typed options: RunConfig (one run of main.py) and the YAML model lists of launch.py."""

from pathlib import Path

import pytest

from tracing.config import RunConfig
from tracing.errors import TracingError
from tracing.model_lists import load_config

ROOT = Path(__file__).resolve().parent.parent


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_flat_list_gives_all_pairs_once(tmp_path):
    cfg = load_config(write_yaml(tmp_path / "c.yaml", "models: [a, b, c, b, a]\n"))
    assert cfg.flat == "all"
    assert [(p.base, p.ft) for p in cfg.pairs] == [("a", "b"), ("a", "c"), ("b", "c")]
    assert cfg.duplicates == 7  # of the 10 pairs i<j: self pairs a-a, b-b and repeats like b-a are dropped


def test_bare_list_is_the_original_flat_format(tmp_path):
    cfg = load_config(write_yaml(tmp_path / "c.yaml", "- a\n- b\n"))
    assert [(p.base, p.ft) for p in cfg.pairs] == [("a", "b")]


def test_split_and_specified_forms(tmp_path):
    split = load_config(write_yaml(tmp_path / "s.yaml", "base_models: [a, b]\nft_models: [x, y]\n"))
    assert split.flat == "split" and len(split.pairs) == 4
    spec = load_config(write_yaml(tmp_path / "p.yaml", "models_1: [org/a, org/b]\nmodels_2: [org/x, org/x]\n"
                                          "names_1: [A, B]\nnames_2: [X, X]\n"))
    assert spec.flat == "specified"
    assert [(p.base, p.ft, p.base_name, p.ft_name) for p in spec.pairs] == [
        ("org/a", "org/x", "A", "X"), ("org/b", "org/x", "B", "X")]


def test_shipped_configs_parse():
    sizes = {"llama7b.yaml": 210, "llama7b_split.yaml": 98, "llama_specified.yaml": 4, "demo.yaml": 3}
    for name, n in sizes.items():
        assert len(load_config(ROOT / "config" / name).pairs) == n, name


def test_malformed_yaml_names_file_and_line(tmp_path):
    path = write_yaml(tmp_path / "bad.yaml", "models:\n  - a\n  - b\nslurm: {gpus_per_node: 0\n")
    with pytest.raises(TracingError, match=r"malformed YAML in .*bad\.yaml:\d+"):
        load_config(path)


def test_unknown_keys_list_the_valid_ones(tmp_path):
    with pytest.raises(TracingError, match=r"unknown key\(s\) modles; valid keys: models, base_models"):
        load_config(write_yaml(tmp_path / "c.yaml", "modles: [a, b]\n"))
    with pytest.raises(TracingError, match=r"unknown slurm key\(s\) gpu; valid: partition"):
        load_config(write_yaml(tmp_path / "c.yaml", "models: [a, b]\nslurm: {gpu: 1}\n"))
    with pytest.raises(TracingError, match=r"unknown main key\(s\) statistic; valid: .*stat"):
        load_config(write_yaml(tmp_path / "c.yaml", "models: [a, b]\nmain: {statistic: csu}\n"))


@pytest.mark.parametrize("text", ["", "models: []\n", "models: [only-one]\n", "base_models: [a]\nft_models: []\n"])
def test_empty_model_list_is_refused(tmp_path, text):
    with pytest.raises(TracingError, match="empty|no model pairs"):
        load_config(write_yaml(tmp_path / "c.yaml", text))


def test_main_block_values_are_checked_before_anything_runs(tmp_path):
    with pytest.raises(TracingError, match="--num_perm must be an integer, got 'many'"):
        load_config(write_yaml(tmp_path / "c.yaml", "models: [a, b]\nmain: {num_perm: many}\n"))
    with pytest.raises(TracingError, match="--align is a switch"):
        load_config(write_yaml(tmp_path / "c.yaml", "models: [a, b]\nmain: {align: 'yes'}\n"))
    with pytest.raises(TracingError, match="unknown main key\\(s\\) save"):  # set per pair by launch.py
        load_config(write_yaml(tmp_path / "c.yaml", "models: [a, b]\nmain: {save: elsewhere}\n"))


def test_run_config_parses_values_from_yaml_and_the_command_line_alike():
    from_yaml = RunConfig.from_dict({"base_model_id": "a", "ft_model_id": "b", "alphas": [0, 0.5, 1],
                                     "layers": [0, 2], "num_perm": 9})
    from_cli = RunConfig.from_dict({"base_model_id": "a", "ft_model_id": "b", "alphas": "0,0.5,1",
                                    "layers": "0,2", "num_perm": "9"})
    assert from_yaml == from_cli and from_cli.alphas == (0.0, 0.5, 1.0) and from_cli.layers == (0, 2)
    assert RunConfig(base_model_id="a", ft_model_id="b", layers="1,3-5").layers == (1, 3, 4, 5)


@pytest.mark.parametrize("options, message", [
    ({}, "both --base_model_id and --ft_model_id are required"),
    ({"base_model_id": "a", "ft_model_id": "b", "alpha": 1.5}, "must lie in \\[0, 1\\]"),
    ({"base_model_id": "a", "ft_model_id": "b", "num_perm": -1}, "--num_perm must be >= 0"),
    ({"base_model_id": "a", "ft_model_id": "b", "block_size": 0}, "must be positive"),
    ({"base_model_id": "a", "ft_model_id": "b", "compare": "foo"}, "--compare takes 'word=other'"),
    ({"base_model_id": "a", "ft_model_id": "b", "layers": "1-x"}, "--layers takes indices"),
    ({"base_model_id": "a", "ft_model_id": "b", "statistic": "csu"}, "unknown key\\(s\\) statistic; valid: "),
    ({"base_model_id": "a", "ft_model_id": "b", "matching": "lapjv"}, "unknown --matching 'lapjv'; valid: fast"),
    ({"base_model_id": "a", "ft_model_id": "b", "memory_budget": "lots"}, "--memory_budget takes a positive size"),
    ({"base_model_id": "a", "ft_model_id": "b", "memory_budget": "-3GB"}, "--memory_budget takes a positive size"),
    ({"base_model_id": "a", "ft_model_id": "b", "memory_budget": "8 parsecs"}, "like 8GiB, 500MB or 2e9"),
])
def test_bad_options_are_one_line_errors(options, message):
    with pytest.raises(TracingError, match=message):
        RunConfig.from_dict(options)


def test_memory_budget_takes_sizes_with_units():
    sizes = {"8GiB": 8 * 2**30, "500MB": 500 * 10**6, "2e9": 2 * 10**9, "1.5 gb": 15 * 10**8, 4096: 4096}
    for text, n in sizes.items():
        cfg = RunConfig(base_model_id="a", ft_model_id="b", memory_budget=text)
        assert cfg.memory_budget == n and RunConfig(base_model_id="a", ft_model_id="b", memory_budget=str(n)) == cfg
    assert "--memory_budget 8589934592" in RunConfig(base_model_id="a", ft_model_id="b", memory_budget="8GiB",
                                                     matching="exact").command_line()


def test_command_line_repeats_the_run():
    cfg = RunConfig(base_model_id="org/a b", ft_model_id="c", stat="csu", align=True, alphas=(0, 1), seed=3)
    line = cfg.command_line()
    assert line == ("python main.py --base_model_id 'org/a b' --ft_model_id c --stat csu --align "
                    "--alphas 0.0,1.0 --seed 3")
    assert "token" not in line and "token" not in cfg.to_dict()
