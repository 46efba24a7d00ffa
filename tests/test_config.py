import pytest
import yaml

from insclr.config import Config, ConfigError, dump_config, load_config, save_config


def write(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


def test_defaults():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg.loss.margin == 0.4
    assert cfg.model.gem_p == 3.0


def test_base_inheritance_child_wins(tmp_path):
    write(tmp_path / "base.yaml", {"train": {"steps": 10, "lr": 0.5}, "model": {"arch": "resnet50"}})
    child = write(tmp_path / "child.yaml", {"base": "base.yaml", "train": {"steps": 20}})
    cfg = load_config(child)
    assert cfg.train.steps == 20          # child wins
    assert cfg.train.lr == 0.5            # inherited
    assert cfg.model.arch == "resnet50"


def test_two_level_chain_and_override(tmp_path):
    write(tmp_path / "a.yaml", {"train": {"steps": 1, "batch": 8}})
    write(tmp_path / "b.yaml", {"base": "a.yaml", "train": {"steps": 2}})
    c = write(tmp_path / "c.yaml", {"base": "b.yaml", "train": {"batch": 4}})
    cfg = load_config(c, ["train.steps=100", "memory.mode=a+i_tr2_max0.50_t0.70", "data.crop_scale=[0.4,1.0]"])
    assert cfg.train.steps == 100
    assert cfg.train.batch == 4
    assert cfg.memory.mode == "a+i_tr2_max0.50_t0.70"
    assert cfg.data.crop_scale == (0.4, 1.0)


def test_int_accepted_for_float_and_tuple_coercion(tmp_path):
    f = write(tmp_path / "x.yaml", {"train": {"lr": 1, "milestones": 5}, "noaug": {"scales": [1, 0.5]}})
    cfg = load_config(f)
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.train.milestones == (5,)
    assert cfg.noaug.scales == (1.0, 0.5)


def test_unknown_key_names_key_and_file(tmp_path):
    f = write(tmp_path / "bad.yaml", {"train": {"stepz": 3}})
    with pytest.raises(ConfigError, match=r"bad\.yaml.*train\.stepz"):
        load_config(f)


def test_unknown_section(tmp_path):
    f = write(tmp_path / "bad.yaml", {"trian": {"steps": 3}})
    with pytest.raises(ConfigError, match="unknown key 'trian'"):
        load_config(f)


def test_wrong_type_names_key_and_file(tmp_path):
    f = write(tmp_path / "bad.yaml", {"train": {"steps": "many"}})
    with pytest.raises(ConfigError, match=r"bad\.yaml.*'train\.steps' must be an integer"):
        load_config(f)
    g = write(tmp_path / "bad2.yaml", {"noaug": {"enabled": "yes please"}})
    with pytest.raises(ConfigError, match="noaug.enabled"):
        load_config(g)


def test_error_names_the_base_file_that_set_the_key(tmp_path):
    write(tmp_path / "base.yaml", {"train": {"batch": 1.5}})
    child = write(tmp_path / "child.yaml", {"base": "base.yaml", "train": {"steps": 2}})
    with pytest.raises(ConfigError, match=r"base\.yaml.*train\.batch"):
        load_config(child)


def test_bad_override():
    with pytest.raises(ConfigError, match="override"):
        load_config(None, ["train.steps"])
    with pytest.raises(ConfigError, match="command-line override.*train.steps"):
        load_config(None, ["train.steps=abc"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "broken.yaml"
    bad.write_text("train: [unclosed")
    with pytest.raises(ConfigError, match="broken.yaml"):
        load_config(bad)


def test_circular_base(tmp_path):
    write(tmp_path / "a.yaml", {"base": "b.yaml"})
    write(tmp_path / "b.yaml", {"base": "a.yaml"})
    with pytest.raises(ConfigError, match="circular"):
        load_config(tmp_path / "a.yaml")


def test_save_round_trip(tmp_path):
    cfg = load_config(None, ["train.steps=7", "eval.data=[roxford5k,rparis6k]"])
    save_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(tmp_path / "resolved.yaml")
    assert again == cfg
    assert "steps: 7" in dump_config(cfg)
