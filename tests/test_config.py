import pytest

from calibflow.config import Config, load_config
from calibflow.errors import ConfigError


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
    config = load_config(
        "params.yaml", ["train.epochs=3", "data.path=data/other", "train.augment=false", "data.allowed_sizes=[32x32]"]
    )
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


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.epochs=three", "expected an integer"),
        ("train.augment=1", "expected true or false"),
        ("model.arch=vgg", "must be one of"),
        ("split.train=0.9", "sum to"),
        ("gates.max_ece=2", r"must be in \[0, 1\]"),
        ("data.allowed_sizes=[32by32]", "WIDTHxHEIGHT"),
        ("data.allowed_sizes=[32]", "WIDTHxHEIGHT"),  # a number is read as its digits, still not a size
        ("registry.model_name=[a]", "expected a string"),
        ("train.device=tpu", "use auto, cpu"),
        ("noequals", "KEY=VALUE"),
    ],
)
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


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.momentum=-3", r"train.momentum = -3.0: must be in \[0, 1\)"),
        ("train.momentum=1", r"train.momentum = 1.0: must be in \[0, 1\)"),
        ("train.label_smoothing=5", r"train.label_smoothing = 5.0: must be in \[0, 1\)"),
        ("seed=-1", r"seed = -1: must be in \[0, 4294967295\]"),
        ("train.lr=.nan", "train.lr = nan: must be a finite number"),
        ("train.lr=.inf", "train.lr = inf: must be a finite number"),
        ("train.weight_decay=.nan", "train.weight_decay = nan: must be a finite number"),
        ("train.weight_decay=-1e-4", "train.weight_decay = -0.0001: must be 0 or more"),
        ("calibration.max_temperature=.inf", "calibration.max_temperature = inf: must be a finite number"),
        ("calibration.min_temperature=.nan", "calibration.min_temperature = nan: must be a finite number"),
        ("train.device=cuda:abc", "train.device = 'cuda:abc': use auto, cpu, cuda or cuda:N"),
        ("train.device=cuda:-1", "train.device = 'cuda:-1': use auto, cpu, cuda or cuda:N"),
        ("train.device=cudafoo", "train.device = 'cudafoo': use auto, cpu, cuda or cuda:N"),
        ("evaluation.n_bins=1000000000", r"evaluation.n_bins = 1000000000: must be in \[1, 1000\]"),
        ("model.width=100000", r"model.width = 100000: must be in \[1, 1024\]"),
        ("gates.max_ece_increase=-0.01", "gates.max_ece_increase = -0.01: must be 0 or more"),
        ("gates.max_accuracy_drop=-0.5", "gates.max_accuracy_drop = -0.5: must be 0 or more"),
        ("gates.max_nll=-1", "gates.max_nll = -1.0: must be 0 or more"),
        ("gates.max_nll=.nan", "gates.max_nll = nan: must be a finite number"),
        ("gates.max_ece=.nan", "gates.max_ece = nan: must be a finite number"),
        ("gates.confidence=0.5", r"gates.confidence = 0.5: must be in \(0.5, 1\)"),
        ("gates.confidence=1", r"gates.confidence = 1.0: must be in \(0.5, 1\)"),
        ("gates.n_resamples=99", r"gates.n_resamples = 99: must be in \[100, 100000\]"),
        ("gates.n_resamples=1000000000", r"gates.n_resamples = 1000000000: must be in \[100, 100000\]"),
        ("gates.metric=mce", "gates.metric = 'mce': must be one of 'ece', 'smooth_ece'"),
        ("registry.model_name=a/b", "registry.model_name = 'a/b': must be non-empty, without '/' or ':'"),
        ("train.epochs=[", "override 'train.epochs=\\[': the value is not YAML"),
        # Whole numbers that size an allocation or a loop: a typo is refused naming the key and the
        # fix, never an overflow traceback in torch or a run that never ends.
        ("train.epochs=100000000000", "train.epochs = 100000000000: the number of epochs must be at most 10000; set"),
        (
            "train.batch_size=100000000000000000000",
            "train.batch_size = 100000000000000000000: the batch size must be at most 65536",
        ),
        (
            "train.val_every=100000000000",
            "train.val_every = 100000000000: epochs between validation passes must be at most",
        ),
        (
            "evaluation.batch_size=100000000000000000000",
            "evaluation.batch_size = 100000000000000000000: the batch size must be at most 65536",
        ),
        (
            "data.min_per_class=100000000000000000000",
            "data.min_per_class = 100000000000000000000: images per class must be at most",
        ),
        (
            "shift.max_images=100000000000000000000",
            "shift.max_images = 100000000000000000000: the number of test images must be at most",
        ),
        (
            "ood.max_images=100000000000000000000",
            "ood.max_images = 100000000000000000000: the number of OOD images must be at most",
        ),
        (
            "decision.raps_k_reg=100000000000000000000",
            r"decision.raps_k_reg = 100000000000000000000: a number of labels, must be in \[0, 100000\]",
        ),
        (
            "train.nnodes=100000000000000000000",
            "train.nnodes = 100000000000000000000: the number of nodes must be at most 1024",
        ),
        # YAML reads 1e20 as text and 1.0e+20 as a float: neither is an integer, nor a crash.
        ("train.batch_size=1e20", r"train.batch_size = '1e20': expected an integer written in digits \(e.g. 64"),
        ("train.epochs=1e11", r"train.epochs = '1e11': expected an integer written in digits"),
        ("train.batch_size=1.0e+20", r"train.batch_size = 1e\+20: expected an integer written in digits"),
        ("train.epochs=.inf", r"train.epochs = inf: expected an integer"),
    ],
)
def test_values_a_run_cannot_use_are_refused_naming_key_value_and_what_is_allowed(override, message):
    with pytest.raises(ConfigError, match=message) as caught:
        load_config("params.yaml", [override])
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    "override",
    [
        "train.device=cuda:0",
        "train.device=cuda:12",
        "train.device=cuda",
        "seed=4294967295",
        "train.momentum=0",
        "gates.max_ece_increase=0",
        "gates.max_nll=2.5",
        "gates.metric=smooth_ece",
        "evaluation.n_bins=1000",
        "model.width=1024",
        "train.epochs=10000",
        "train.batch_size=65536",
        "evaluation.batch_size=65536",
        "decision.raps_k_reg=0",
        "registry.model_name=it's-digits",
    ],
)
def test_edge_values_that_a_run_can_use_are_accepted(override):
    load_config("params.yaml", [override])


def test_gates_metric_defaults_to_the_smooth_ece():
    assert load_config("params.yaml").gates.metric == "smooth_ece"
    assert load_config(None).gates.metric == "smooth_ece"


def test_a_key_given_twice_is_an_error_naming_it_and_both_lines(tmp_path):
    text = "gates:\n  max_ece: 0.05\n  min_accuracy: 0.9\n  max_ece: 0.5\n"
    with pytest.raises(ConfigError, match=r"key 'max_ece' is given twice \(lines 2 and 4\)"):
        load_config(write(tmp_path, text))
    with pytest.raises(ConfigError, match="key 'seed' is given twice"):
        load_config(write(tmp_path, "seed: 0\ntrain: {epochs: 3}\nseed: 1\n"))
    with pytest.raises(ConfigError, match="key 'epochs' is given twice"):
        load_config("params.yaml", ["train={epochs: 3, epochs: 4}"])


@pytest.mark.parametrize(
    "content, message",
    [
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", "is not UTF-8 text"),
        (b"seed: 0\ntrain: [epochs: 3\n", "is not valid YAML: .* at line"),
        (b"seed: 0\n\tepochs: 3\n", "is not valid YAML"),
        (b"seed: !!python/object/apply:os.system ['true']\n", "is not valid YAML"),
        (b"- just\n- a list\n", "must hold a mapping of sections"),
    ],
)
def test_a_params_file_that_is_not_yaml_is_a_config_error_on_one_line(tmp_path, content, message):
    path = tmp_path / "params.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=message) as caught:
        load_config(path)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.loss=hinge", "train.loss = 'hinge': must be one of 'cross_entropy', 'focal', 'flsd53'"),
        ("train.mix=mixcut", "train.mix = 'mixcut': must be one of 'none', 'mixup', 'cutmix'"),
        ("train.focal_gamma=-1", "train.focal_gamma = -1.0: must be 0 or more"),
        ("train.confidence_penalty=-0.1", "train.confidence_penalty = -0.1: must be 0 or more"),
        ("train.mmce_weight=-2", "train.mmce_weight = -2.0: must be 0 or more"),
        ("train.mix_alpha=0", "train.mix_alpha = 0.0: must be positive"),
        ("train.mix_alpha=-0.2", "train.mix_alpha = -0.2: must be positive"),
        ("model.ensemble=0", "model.ensemble = 0: must be positive"),
        ("model.ensemble=1000", r"model.ensemble = 1000: must be in \[1, 32\]"),
        ("model.mc_dropout=0", "model.mc_dropout = 0: must be positive"),
        ("model.dropout=1", r"model.dropout = 1.0: must be in \[0, 1\)"),
        ("model.mc_dropout=10", "model.mc_dropout = 10: needs model.dropout > 0"),
    ],
)
def test_train_time_calibration_keys_refuse_what_a_run_cannot_use(override, message):
    with pytest.raises(ConfigError, match=message) as caught:
        load_config("params.yaml", [override])
    assert "\n" not in str(caught.value)


def test_train_time_calibration_keys_compose():
    config = load_config(
        "params.yaml",
        [
            "train.loss=flsd53",
            "train.mix=cutmix",
            "train.mix_alpha=0.3",
            "train.label_smoothing=0.1",
            "model.ensemble=3",
            "model.dropout=0.2",
            "model.mc_dropout=8",
            "calibration.method=vector",
        ],
    )
    assert (config.train.loss, config.train.mix, config.model.ensemble, config.model.mc_dropout) == (
        "flsd53",
        "cutmix",
        3,
        8,
    )


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.val_every=0", "train.val_every = 0: must be positive"),
        ("train.val_every=-3", "train.val_every = -3: must be positive"),
        ("train.val_every=2.5", "train.val_every = 2.5: expected an integer"),
        ("train.val_every=true", "train.val_every = True: expected an integer"),
        ("train.threads=0", r"train.threads = 0: use a number of threads in \[1, 1024\] or auto"),
        ("train.threads=-1", r"train.threads = -1: use a number of threads in \[1, 1024\] or auto"),
        ("train.threads=100000", r"train.threads = 100000: use a number of threads in \[1, 1024\] or auto"),
        ("train.threads=two", "train.threads = 'two': expected"),
        ("train.threads=1.5", "train.threads = 1.5: expected"),
    ],
)
def test_speed_keys_refuse_what_a_run_cannot_use(override, message):
    with pytest.raises(ConfigError, match=message) as caught:
        load_config("params.yaml", [override])
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    "override, key, value",
    [
        ("train.val_every=1", "val_every", 1),
        ("train.val_every=1000", "val_every", 1000),
        ("train.threads=2", "threads", 2),
        ("train.threads=auto", "threads", "auto"),
    ],
)
def test_speed_keys_accept_what_a_run_can_use(override, key, value):
    assert getattr(load_config("params.yaml", [override]).train, key) == value


def test_speed_keys_say_the_same_default_in_params_yaml_and_the_code():
    """params.yaml spells the defaults out for users; the dataclass is where they are decided."""
    from_file, built_in = load_config("params.yaml").train, load_config(None).train
    assert (from_file.val_every, from_file.threads) == (built_in.val_every, built_in.threads)


def test_each_section_constructed_in_code_is_not_checked_until_loaded():
    """Bounds and relations are checked by load_config, not on construction: code and tests build
    sections with any values (gate plans replace thresholds, tests set extremes)."""
    from calibflow.config import GatesConfig, ModelConfig

    assert GatesConfig(max_ece=2.0).max_ece == 2.0
    assert ModelConfig(mc_dropout=8, dropout=0.0).mc_dropout == 8


def test_a_shift_aware_corruption_that_does_not_exist_is_refused_naming_its_key():
    with pytest.raises(
        ConfigError, match=r"calibration.shift_corruptions: unknown corruption 'speckle' \(did you mean"
    ):
        load_config("params.yaml", ["calibration.shift_corruptions=[speckle]"])


def test_the_math_modules_own_their_defaults_and_the_config_reads_them_from_there():
    """One default in one place: a library function's keyword default is its own module's constant,
    and params.yaml's default for the same setting is that constant (config imports the math
    modules, never the other way round: tests/test_import_graph.py checks the layers)."""
    import calibflow.config as config
    from calibflow.calibrators import temperature
    from calibflow.data import splits
    from calibflow.evaluation import corruptions
    from calibflow.metrics import reliability

    assert config.DEFAULT_N_BINS is reliability.DEFAULT_N_BINS == Config().evaluation.n_bins
    assert (config.DEFAULT_MIN_TEMPERATURE, config.DEFAULT_MAX_TEMPERATURE) == (
        temperature.DEFAULT_MIN_TEMPERATURE,
        temperature.DEFAULT_MAX_TEMPERATURE,
    )
    assert (Config().calibration.min_temperature, Config().calibration.max_temperature) == (
        temperature.DEFAULT_MIN_TEMPERATURE,
        temperature.DEFAULT_MAX_TEMPERATURE,
    )
    assert config.CORRUPTION_NAMES is corruptions.CORRUPTION_NAMES
    assert config.SPLIT_NAMES is splits.SPLIT_NAMES == tuple(Config().split.fractions())
