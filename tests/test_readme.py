"""The README's library example runs as written (its first python block)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_library_block_runs(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python block"
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks[0], "README.md", "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["relu_256_c0.5", "relu_256_c1", "topk_256_k8"]
    assert (tmp_path / "runs/readme/my_sae/cfg.json").exists()
    assert sorted(p.name for p in (tmp_path / "runs/readme/sweep/saes").iterdir()) == ["relu_256_c0.5", "relu_256_c1", "topk_256_k8"]
