import pytest

from beit3.config import ConfigError, load_config
from beit3.pretrain.model_config import ModelConfig

from conftest import MODEL_CONFIGS


@pytest.mark.parametrize("name", ["tiny", "base", "large", "giant"])
def test_shipped_configs_load(name):
    config = load_config(ModelConfig, MODEL_CONFIGS / f"{name}.yaml")
    assert config.name == name


def test_giant_is_the_papers_shape():
    giant = load_config(ModelConfig, MODEL_CONFIGS / "giant.yaml")
    assert (giant.layers, giant.hidden, giant.ffn_hidden, giant.heads) == (40, 1408, 6144, 16)
    assert (giant.attention, giant.vl_expert_layers, giant.patch_size, giant.image_tokens) == ("shared", 3, 14, 257)
    assert [giant.has_vl_expert(i) for i in (36, 37, 38, 39)] == [False, True, True, True]


def write(tmp_path, text):
    path = tmp_path / "model.yaml"
    path.write_text(text)
    return path


BASE = "name: x\nlayers: 2\nhidden: 64\nffn_hidden: 128\nheads: 4\nattention: decoupled\n"


def test_error_names_the_offending_field(tmp_path):
    with pytest.raises(ConfigError) as error:
        load_config(ModelConfig, write(tmp_path, BASE.replace("heads: 4", "heads: four")))
    assert "heads" in str(error.value) and "model.yaml" in str(error.value)


def test_unknown_field_is_rejected_by_name(tmp_path):
    with pytest.raises(ConfigError, match="hiden: unknown field"):
        load_config(ModelConfig, write(tmp_path, BASE + "hiden: 12\n"))


@pytest.mark.parametrize(
    "change, message",
    [
        ("heads: 5", "hidden \\(64\\) must be divisible by heads \\(5\\)"),
        ("attention: mixed", "attention: Input should be 'shared' or 'decoupled'"),
        ("layers: 0", "layers: Input should be greater than 0"),
    ],
)
def test_invalid_values_get_clear_messages(tmp_path, change, message):
    key = change.split(":")[0]
    text = "\n".join(change if line.startswith(key + ":") else line for line in BASE.splitlines())
    with pytest.raises(ConfigError, match=message):
        load_config(ModelConfig, write(tmp_path, text))


def test_vl_layers_cannot_exceed_depth(tmp_path):
    with pytest.raises(ConfigError, match="vl_expert_layers \\(3\\) cannot exceed layers \\(2\\)"):
        load_config(ModelConfig, write(tmp_path, BASE + "vl_expert_layers: 3\n"))


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(ModelConfig, tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(ModelConfig, write(tmp_path, "name: [unclosed\n"))
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(ModelConfig, write(tmp_path, "- a list\n"))
