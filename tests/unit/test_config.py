from pathlib import Path

import pytest

from tasks.core.config import ConfigError, load_params


def write(tmp_path, text):
    p = tmp_path / "params.yaml"
    p.write_text(text)
    return p


def test_repo_params_load():
    params = load_params("params.yaml")
    assert params.ingest.source == "builtin:digits"
    assert params.validate_.max_imbalance_ratio >= 1
    assert params.paths.shards_dir == "data/shards"


def test_unknown_key_names_file_and_key(tmp_path):
    p = write(tmp_path, "ingest:\n  sorce: x\n")
    with pytest.raises(ConfigError, match=r"params.yaml.*\n  ingest.sorce: unknown key"):
        load_params(p)


def test_bad_fractions_named(tmp_path):
    p = write(tmp_path, "split:\n  fractions: {train: 0.8, val: 0.1, test: 0.2}\n")
    with pytest.raises(ConfigError, match=r"split: .*fractions must sum to 1.0, got 1.1"):
        load_params(p)


def test_wrong_type_named(tmp_path):
    p = write(tmp_path, "shard:\n  resolution: big\n")
    with pytest.raises(ConfigError, match=r"shard.resolution: .*integer"):
        load_params(p)


def test_unknown_section(tmp_path):
    p = write(tmp_path, "trian:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown top-level key\(s\) \['trian'\]"):
        load_params(p)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")


def test_not_a_mapping(tmp_path):
    p = write(tmp_path, "- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_params(p)


def test_validate_bounds_must_be_ordered(tmp_path):
    p = write(tmp_path, "validate:\n  min_width: 8\n  max_width: 4\n")
    with pytest.raises(ConfigError, match=r"validate: .*min_width=8 is greater than max_width=4"):
        load_params(p)


def test_an_unknown_shard_decode_is_named(tmp_path):
    p = write(tmp_path, "shard:\n  decode: fast\n")
    with pytest.raises(ConfigError, match=r"shard.decode: .*'scaled' or 'full'"):
        load_params(p)


@pytest.mark.parametrize("section", ["ingest", "shard"])
def test_a_scheduler_address_without_executor_dask_is_refused(tmp_path, section):
    p = write(tmp_path, f"{section}:\n  scheduler_address: tcp://10.0.0.5:8786\n")
    with pytest.raises(ConfigError, match=rf"{section}: .*scheduler_address='tcp://10.0.0.5:8786' is read only with "
                       rf"executor: dask, and {section}.executor is 'local': set {section}.executor: dask to run on "
                       "that scheduler, or remove the address to run locally"):
        load_params(p)
    ok = write(tmp_path, f"{section}:\n  scheduler_address: tcp://10.0.0.5:8786\n  executor: dask\n")
    assert getattr(load_params(ok), section).scheduler_address == "tcp://10.0.0.5:8786"


def test_a_flow_section_is_refused_and_points_at_the_flow_arguments(tmp_path):
    """Nothing reads a `flow:` section: accepting it would let a user believe their retries were set."""
    p = write(tmp_path, "flow:\n  io_retries: 5\n")
    with pytest.raises(ConfigError, match=r"unknown top-level key\(s\) \['flow'\].*python -m flows.pipeline --help"):
        load_params(p)


def test_the_schema_defaults_are_params_yaml():
    """One set of defaults: every value params.yaml ships equals the typed schema's default, so the code, the
    tests that build a section with defaults and a user's params.yaml all mean the same recipe."""
    import yaml

    from tasks.core.config import Params

    raw = yaml.safe_load(Path("params.yaml").read_text())
    differ = []
    for name, field in Params.model_fields.items():
        section = raw.get(field.alias or name)
        defaults = field.annotation().model_dump(exclude_none=True)  # sweep.space: {low, high, log}
        for key, value in (section or {}).items():
            if defaults.get(key) != value:
                differ.append(f"{field.alias or name}.{key}: schema {defaults.get(key)!r}, params.yaml {value!r}")
    assert not differ, "\n".join(differ)
