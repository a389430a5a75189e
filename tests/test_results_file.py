"""infer.py --results / --resume / --json / --html (issue 35, items 7-13): the results file survives a torn line, lines
that are not its records, a second writer and a changed configuration; output paths fail before the model loads."""

import fcntl
import json
import os
import resource
import signal
import subprocess
import sys

import pytest

from scripted import OPTIONS, QUESTION

pytestmark = pytest.mark.slow  # every test here runs infer.py end to end

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def infer(scripted_dir, *extra, **kwargs):
    return subprocess.run([sys.executable, os.path.join(REPO, "infer.py"), "--model", scripted_dir,
                           "--overview-fps", "0.25", "--max-new-tokens", "64", *extra],
                          capture_output=True, text=True, timeout=600, **kwargs)


def table_rows(out):
    """The kind table's rows: kind -> n."""
    rows = out[out.index("\nkind "):].strip().split("\nmean frames")[0].split("\n\n")[0].splitlines()[1:]
    return {row.split()[0]: int(row.split()[1]) for row in rows}


@pytest.fixture(scope="module")
def finished(scripted_dir, index_video, tmp_path_factory):
    """A question set whose two rows are the same question, and the results file of one whole run over it."""
    folder = tmp_path_factory.mktemp("results")
    row = {"video": index_video, "question": QUESTION, "options": OPTIONS, "answer": "C", "kind": "needle"}
    data = folder / "twice.jsonl"
    data.write_text((json.dumps(row) + "\n") * 2)
    result = infer(scripted_dir, "--data", str(data), "--results", str(folder / "done.jsonl"))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return data, (folder / "done.jsonl").read_text()


def resume(scripted_dir, data, results, text, *extra):
    results.write_text(text)
    result = infer(scripted_dir, "--data", str(data), "--results", str(results), "--resume", *extra)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result.stdout


def test_a_torn_last_line_is_cut_before_appending(scripted_dir, finished, tmp_path):
    # A kill (or a full disk) mid-write leaves half a line; the next record once went on after it, glued into one
    # line no reader can parse, and was lost on every later resume.
    data, text = finished
    lines = text.splitlines(keepends=True)
    out = resume(scripted_dir, data, tmp_path / "r.jsonl", "".join(lines[:-1]) + lines[-1][:len(lines[-1]) // 2])
    assert "1 to go" in out
    written = (tmp_path / "r.jsonl").read_text().splitlines()
    assert len(written) == len(lines) and [json.loads(line) for line in written]  # every line whole
    assert table_rows(out) == {"needle": 2}


def test_lines_that_are_not_records_are_skipped_with_their_number(scripted_dir, finished, tmp_path):
    # A number, a string, null, an object missing the record's fields: one note each, never a traceback.
    data, text = finished
    junk = ['5', '"monkey"', 'null', '{"key": "x", "kind": "needle"}']
    out = resume(scripted_dir, data, tmp_path / "r.jsonl", text + "\n".join(junk) + "\n")
    first = len(text.splitlines()) + 1
    for number in range(first, first + len(junk)):
        assert sum(line.startswith("note: ") and f" line {number}: " in line and line.endswith("skipped")
                   for line in out.splitlines()) == 1, out
    assert "0 to go" in out and table_rows(out) == {"needle": 2}


def test_a_repeated_row_is_a_question_of_its_own(scripted_dir, finished, tmp_path):
    # The data file holds one question twice: two records under two keys, and a resume counts both (one key once
    # made the second row vanish from the resumed table).
    data, text = finished
    records = [json.loads(line) for line in text.splitlines()[1:]]
    assert len(records) == 2 and len({r["key"] for r in records}) == 2
    out = resume(scripted_dir, data, tmp_path / "r.jsonl", text)
    assert "resume: 2 questions already in" in out and table_rows(out) == {"needle": 2}


def test_a_second_run_on_one_results_file_refuses(scripted_dir, finished, tmp_path):
    # Two runs appending to one file would interleave and each truncate the other's; the second stops at once, and
    # the first's lock goes with its process, even killed.
    data, _ = finished
    results = tmp_path / "r.jsonl"
    first = subprocess.Popen([sys.executable, os.path.join(REPO, "infer.py"), "--model", scripted_dir, "--data",
                              str(data), "--results", str(results), "--batch-size", "1"], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)
    for line in first.stdout:
        if line.startswith("note: "):  # the model is loading: the file is locked
            break
    first.send_signal(signal.SIGSTOP)  # held, lock and all: on a fast machine it could otherwise finish first
    second = infer(scripted_dir, "--data", str(data), "--results", str(results), "--resume")
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=60)
    assert second.returncode == 2 and second.stderr.count("\n") == 1, second.stdout[-2000:] + second.stderr[-2000:]
    assert second.stderr.startswith(f"error: --results {results}: another infer.py run is writing it")
    with open(results, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free again: the killed run's lock went with it


def test_resume_with_another_configuration_refuses(scripted_dir, finished, tmp_path):
    # The first line records what produced the file; adding another seed's or budget's questions to it would give a
    # table of no one configuration.
    data, text = finished
    header = json.loads(text.splitlines()[0])["videozoomer_results"]
    assert header["model"] == scripted_dir and len(header["weights"]) == 16 and header["no_tool"] is False
    assert (header["seed"], header["max_turns"]) == (0, 5)
    (tmp_path / "r.jsonl").write_text(text)
    result = infer(scripted_dir, "--data", str(data), "--results", str(tmp_path / "r.jsonl"), "--resume",
                   "--seed", "4", "--max-turns", "3")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "--max-turns 5 there, 3 here" in result.stderr and "--seed 0 there, 4 here" in result.stderr
    assert (tmp_path / "r.jsonl").read_text() == text


def test_output_paths_fail_before_the_model_loads_and_a_full_disk_leaves_files_whole(scripted_dir, index_video,
                                                                                       tmp_path):
    common = ["--video", index_video, "--question", QUESTION]
    for flag, path, why in (("--json", tmp_path, "is a directory"), ("--html", tmp_path / "no" / "p.html",
                            "no such folder"), ("--json", "/sys/t.json", "cannot write there")):
        result = infer(scripted_dir, *common, flag, str(path))
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert result.stderr.startswith(f"error: {flag} {path}: {why}"), result.stderr
        assert "note:" not in result.stdout  # the model never loaded
    # A full disk, as the kernel reports a file size limit (EFBIG): one line, and the old page is still there whole.
    (tmp_path / "page.html").write_text("the old page")
    result = infer(scripted_dir, *common, "--max-turns", "1", "--html", str(tmp_path / "page.html"),
                   preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000)))
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path / 'page.html'}: cannot write (File too large); the file is as it was before this run")
    assert (tmp_path / "page.html").read_text() == "the old page" and not (tmp_path / "page.html.tmp").exists()
