"""`python -m jobs.import_model` on what a newcomer may hand it by mistake: exit 2 with the reason.
The conversion of a real GGUF file is checked in tests/real_model (make test-real-model)."""

from jobs.import_model import main


def test_a_missing_file_exits_2_with_the_reason(tmp_path, capsys):
    assert main([str(tmp_path / "missing.gguf"), str(tmp_path / "out")]) == 2
    assert "missing.gguf: no such GGUF file" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
