

# -----------------------------------------------------------------------------
# 13. A garbage config.json or tokenizer.json is named in the error


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json", "tokenizer_config.json"])
@pytest.mark.parametrize("content", [b"", b"garbage{", b"[1, 2]"])
def test_garbage_json_in_model_dir_is_named(tiny_dir, tmp_path, name, content):
    import shutil
    damaged = tmp_path / "model"
    shutil.copytree(tiny_dir, damaged)
    (damaged / name).write_bytes(content)
    with pytest.raises(ValueError) as error:
        vz.load_model(str(damaged))
    assert str(damaged / name) in str(error.value) and "\n" not in str(error.value)
