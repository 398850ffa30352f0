"""orchestrator.source: the commit a sweep records, read from a real git checkout."""
import subprocess

from orchestrator import source


def git(root, *args):
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=root, check=True,
                   capture_output=True)


def test_commit_names_the_checkout_and_its_local_changes(tmp_path):
    assert source.commit(tmp_path) == "unknown"                 # not a checkout
    (tmp_path / "a.py").write_text("x = 1\n")
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", "a.py")
    git(tmp_path, "commit", "-q", "-m", "a")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True,
                          check=True).stdout.strip()
    assert source.commit(tmp_path) == head
    (tmp_path / "new.py").write_text("")                        # untracked files do not count
    assert source.commit(tmp_path) == head
    (tmp_path / "a.py").write_text("x = 2\n")
    assert source.commit(tmp_path) == head + "+changes"


def test_history_adds_a_commit_only_when_the_code_changed():
    assert source.history([], "a") == ["a"]
    assert source.history(["a"], "a") == ["a"]                  # a resume on the same code
    assert source.history(["a"], "b") == ["a", "b"]
    assert source.history(["a", "b"], "a") == ["a", "b", "a"]   # back to older code: recorded again
    assert source.history("a", "b") == ["b"]                    # a damaged record is not trusted
    assert source.history(["a", 3], "b") == ["a", "b"]
