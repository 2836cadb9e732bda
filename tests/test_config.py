import pytest

from calibflow.config import Config, ConfigError, load_config


def write(tmp_path, text):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def test_repository_params_load_into_frozen_typed_config():
    config = load_config("params.yaml")
    assert isinstance(config, Config)
    assert isinstance(config.train.weight_decay, float)
    with pytest.raises(AttributeError):
        config.train.epochs = 1  # frozen


def test_unknown_top_level_key_is_an_error_naming_it(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'trian'.*did you mean 'train'"):
        load_config(write(tmp_path, "trian:\n  epochs: 3\n"))


def test_unknown_nested_key_is_an_error_naming_it(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'gates.max_eec'.*did you mean 'max_ece'"):
        load_config(write(tmp_path, "gates:\n  max_eec: 0.1\n"))


def test_override_sets_values_with_yaml_types():
    config = load_config("params.yaml", ["train.epochs=3", "data.path=data/other", "train.augment=false",
                                         "data.allowed_sizes=[32x32]"])
    assert config.train.epochs == 3
    assert config.data.path == "data/other"
    assert config.train.augment is False
    assert config.data.allowed_sizes == ("32x32",)


def test_override_of_unknown_key_names_the_key():
    with pytest.raises(ConfigError, match="unknown key 'train.epoch'.*did you mean 'epochs'"):
        load_config("params.yaml", ["train.epoch=3"])


def test_override_into_a_value_is_rejected():
    with pytest.raises(ConfigError, match="train.epochs is a value"):
        load_config("params.yaml", ["train.epochs.x=3"])


@pytest.mark.parametrize("override, message", [
    ("train.epochs=three", "expected an integer"),
    ("train.augment=1", "expected true or false"),
    ("model.arch=vgg", "must be one of"),
    ("split.train=0.9", "sum to"),
    ("gates.max_ece=2", r"must be in \[0, 1\]"),
    ("data.allowed_sizes=[32by32]", "WIDTHxHEIGHT"),
    ("data.allowed_sizes=[32]", "expected a string"),
    ("train.device=tpu", "use auto, cpu"),
    ("noequals", "KEY=VALUE"),
])
def test_bad_values_are_rejected_with_the_fix(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("params.yaml", [override])


def test_params_hash_follows_the_resolved_values():
    base = load_config("params.yaml")
    assert load_config("params.yaml").params_hash == base.params_hash
    assert load_config("params.yaml", ["seed=1"]).params_hash != base.params_hash


def test_flat_view_uses_dotted_keys():
    flat = load_config("params.yaml").flat()
    assert flat["gates.max_ece"] == load_config("params.yaml").gates.max_ece
    assert "train.epochs" in flat and "registry.model_name" in flat


def test_missing_params_file_says_where(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_params_hash_ignores_what_happens_to_the_model_after_it_is_built():
    base = load_config("params.yaml").params_hash
    for override in ("gates.max_ece=0.2", "promotion.auto=true", "schedule.cron=0 3 * * *", "registry.model_name=x"):
        assert load_config("params.yaml", [override]).params_hash == base, override
    assert load_config("params.yaml", ["calibration.max_temperature=10"]).params_hash != base
