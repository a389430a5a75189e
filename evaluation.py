"""infer.py's evaluation section: the paper's benchmarks read as released, the results file that survives a
kill, and the trajectory viewer (--html). Its one user is `infer.py --data`; it is a module of its own so
that infer.py stays a script that reads like the agent, and so that the layouts can be tested alone."""

import hashlib
import html
import json
import os
import re

from plumbing import fail, jpeg_data_url, one_line, read_rows, text_field
from vz import LETTERS, format_question

# -----------------------------------------------------------------------------
# Benchmarks as released: each layout's rows -> our question rows (video, question, options, answer, kind,
# categories). Field names are the releases' own, as lmms-eval's task code and the benchmarks' READMEs give them.

LAYOUTS = ("ours", "longvideobench", "mlvu", "videomme", "lvbench")


def _lettered(candidates):
    if not isinstance(candidates, list) or not all(isinstance(c, str) for c in candidates) or len(candidates) < 2:
        raise ValueError("candidates must be a list of at least two strings")
    return [f"{LETTERS[i]}. {c}" for i, c in enumerate(candidates)]


def _longvideobench(row, video_dir):
    # lvb_val.json: video_path, question, candidates, correct_choice (index), question_category, duration_group
    options = _lettered(row.get("candidates"))
    choice = row.get("correct_choice")
    if not isinstance(choice, int) or not 0 <= choice < len(options):
        raise ValueError("correct_choice must be the index of one of the candidates")
    return {"video": [os.path.join(video_dir, text_field(row, "video_path"))], "question": text_field(row, "question"),
            "options": options, "answer": LETTERS[choice], "kind": "longvideobench",
            "categories": {"category": str(row.get("question_category", "")),
                           "duration": str(row.get("duration_group", ""))}}


def _mlvu(row, video_dir, task):
    # MLVU dev json/<n>_<task>.json: video, question, candidates, answer (the right candidate's text), question_type;
    # the video under video/<n>_<task>/ (or straight under --video-dir)
    options, answer = _lettered(row.get("candidates")), text_field(row, "answer")
    if answer not in row["candidates"]:
        raise ValueError("answer is not one of the candidates")
    video = text_field(row, "video")
    return {"video": [os.path.join(video_dir, task, video), os.path.join(video_dir, video),
                      os.path.join(video_dir, task.split("_", 1)[-1], video)],
            "question": text_field(row, "question"), "options": options,
            "answer": LETTERS[row["candidates"].index(answer)], "kind": "mlvu",
            "categories": {"task": str(row.get("question_type", task))}}


def _videomme(row, video_dir):
    # Video-MME (parquet or JSON): videoID, question, options (already lettered), answer (a letter), duration,
    # task_type; the video is <videoID>.mp4
    options = row.get("options")
    if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
        raise ValueError("options must be a list of strings")
    return {"video": [os.path.join(video_dir, text_field(row, "videoID") + ext) for ext in (".mp4", ".mkv", ".webm")],
            "question": text_field(row, "question"), "options": [re.sub(r"^([A-Z])\.\s*", r"\1. ", o) for o in options],
            "answer": text_field(row, "answer"), "kind": "videomme",
            "categories": {"duration": str(row.get("duration", "")), "task": str(row.get("task_type", ""))}}


def _lvbench(video_row, video_dir):
    # LVBench video_info.meta.jsonl: one row per video (key), its questions in qa: question with the options
    # inline as "(A) ...", answer (a letter), question_type (a list); the video is <key>.mp4
    key, questions = text_field(video_row, "key"), video_row.get("qa")
    if not isinstance(questions, list):
        raise ValueError("qa must be a list of questions")
    out = []
    for qa in questions:
        text = text_field(qa, "question")
        parts = re.split(r"\n\s*\(([A-Z])\)\s*", text)
        if len(parts) < 5:
            raise ValueError("a question has no inline options \"(A) ...\"")
        types = qa.get("question_type") or []
        out.append({"video": [os.path.join(video_dir, key + ".mp4")], "question": parts[0].strip(),
                    "options": [f"{letter}. {option.strip()}" for letter, option in zip(parts[1::2], parts[2::2])],
                    "answer": text_field(qa, "answer"), "kind": "lvbench",
                    "categories": {"type": ", ".join(types) if isinstance(types, list) else str(types)}})
    return out


def _read_parquet(path):
    """(numbered rows, unread reasons) of a parquet file, as read_rows gives for JSON (a parquet row is always whole)."""
    try:
        import pyarrow.parquet
    except ImportError:
        fail(f"{path}: reading parquet needs pyarrow (pip install pyarrow), or give the JSON release")
    try:
        return [(f"item {i + 1}", row) for i, row in enumerate(pyarrow.parquet.read_table(path).to_pylist())], []
    except (OSError, ValueError) as e:
        fail(f"{path}: not a readable parquet file ({one_line(e)})")


def detect_layout(row):
    """The layout a row's fields say it is in, or None."""
    if not isinstance(row, dict):
        return None
    if "candidates" in row and "correct_choice" in row:
        return "longvideobench"
    if "candidates" in row:
        return "mlvu"
    if "videoID" in row:
        return "videomme"
    if "qa" in row and "key" in row:
        return "lvbench"
    if "question" in row or "problem" in row:
        return "ours"
    return None


def read_benchmark(path, layout=None, video_dir=None):
    """-> (layout, [(where, row)], reasons): a question file (or MLVU's directory of task files) read as our
    question rows. A benchmark's row has `video` a list of candidate paths (the first that exists is the video)
    and `categories` ({name: value}); our layout's rows are as in the file (vz.question_row reads them, paths
    against video_dir or the file's directory). Unreadable rows are reasons [(where, why)]."""
    files = sorted(os.path.join(path, n) for n in os.listdir(path) if n.endswith(".json")) if os.path.isdir(path) \
        else [path]
    rows, reasons = [], []
    for name in files:
        numbered, unread = _read_parquet(name) if name.endswith(".parquet") else read_rows(name)
        suffix = f" of {os.path.basename(name)}" if len(files) > 1 else ""
        rows += [(where + suffix, name, row) for where, row in numbered]
        reasons += [(where + suffix, why) for where, why in unread]
    if layout is None:
        layout = next(filter(None, (detect_layout(row) for _, _, row in rows)), None)
        if layout is None:
            fail(f"{path}: cannot tell the benchmark layout from its fields; name it with --layout "
                 f"({', '.join(LAYOUTS)})")
    questions = []
    for where, name, row in rows:
        base = video_dir or os.path.dirname(os.path.abspath(name))
        try:
            if layout == "ours":  # our questions or the released RL layout: question_row reads them as today
                items = [row]
            elif layout == "longvideobench":
                items = [_longvideobench(row, base)]
            elif layout == "mlvu":
                items = [_mlvu(row, base, os.path.splitext(os.path.basename(name))[0])]
            elif layout == "videomme":
                items = [_videomme(row, base)]
            else:
                items = _lvbench(row, base)
            questions += [(where if len(items) == 1 else f"{where} question {k + 1}", item)
                          for k, item in enumerate(items)]
        except (ValueError, TypeError, AttributeError) as e:
            reasons.append((where, one_line(e)))
    return layout, questions, reasons


# -----------------------------------------------------------------------------
# The trajectory viewer (--html): frames embedded as JPEG, encoded with PyAV


CSS = ("body{font-family:sans-serif;margin:1em}section{border-top:2px solid #888;margin-top:1.5em}"
       "figure{display:inline-block;margin:2px;font-size:70%;text-align:center}"
       "img.overview{height:72px;display:block}img.zoom{height:144px;display:block}"
       ".timeline{position:relative;height:18px;background:#eee;margin:.5em 0 1.6em}"
       ".tick{position:absolute;width:1px;height:18px;background:#555}"
       ".second{position:absolute;top:19px;font-size:70%;transform:translateX(-50%)}"
       ".segment{position:absolute;height:18px;background:rgba(230,120,0,.6)}"
       "pre{white-space:pre-wrap;background:#f6f6f6;padding:.4em}.right{color:green}.wrong{color:#b00}"
       "table{border-collapse:collapse}td,th{padding:0 .6em;text-align:right}")


def write_html(path, records, model, data):
    """A self-contained page: a header (model, data file, accuracy by kind, an index of the questions),
    then per question its timeline, the overview strip and each zoom's frames, all with their times.
    Every distinct frame is embedded once, in a JSON table that a few lines of script put into the
    <img> elements, so an overview shared by many questions about one video costs its bytes once."""
    table = {}

    def strip(frames, group):
        figures = []
        for f in frames:
            key = hashlib.sha1(f.image.tobytes() + str(f.image.shape).encode()).hexdigest()[:16]
            if key not in table:
                table[key] = jpeg_data_url(f.image)
            figures.append(f'<figure class="{group}"><img class="{group}" data-time="{f.time:.3f}" data-frame="{key}" '
                           f'alt="{f.time:.2f}s"><figcaption>{f.time:.2f}s</figcaption></figure>')
        return "".join(figures)

    def verdict(r):
        return "" if r["correct"] is None else ('<b class="right">right</b>' if r["correct"] else '<b class="wrong">wrong</b>')

    parts = [f"<!doctype html><meta charset='utf-8'><title>VideoZoomer trajectories</title><style>{CSS}</style>",
             f"<h1>VideoZoomer trajectories</h1><p>model: {html.escape(str(model))}"
             + (f" | data: {html.escape(str(data))}" if data else "") + "</p>"]
    scored = [r for r in records if r["correct"] is not None]
    if scored:
        rows = "".join(f"<tr><td>{html.escape(kind or '-')}</td><td>{len(group)}</td>"
                       f"<td>{sum(r['correct'] for r in group) / len(group):.3f}</td>"
                       f"<td>{sum(r['num_zooms'] for r in group) / len(group):.2f}</td></tr>"
                       for kind in sorted({r["kind"] for r in scored}) + ["all"]
                       for group in [[r for r in scored if kind in ("all", r["kind"])]])
        parts.append(f"<table><tr><th>kind</th><th>n</th><th>accuracy</th><th>zooms/q</th></tr>{rows}</table>")
    if len(records) > 1:
        parts.append("<ol>" + "".join(f'<li><a href="#q{i}">{html.escape(r["question"][:80])}</a> {verdict(r)}</li>'
                                      for i, r in enumerate(records)) + "</ol>")
    for index, r in enumerate(records):
        frames, overview, duration = r["_frames"], r["_num_overview"], r["duration"]
        truth = f" | truth: {html.escape(str(r['truth']))} {verdict(r)}" if r["truth"] is not None else ""
        parts.append(f'<section class="question" id="q{index}" data-index="{index}"><h3>{html.escape(r["question"])}</h3>'
                     f"<p>video: {html.escape(str(r['video']))} ({duration:.1f}s) | kind: {html.escape(r['kind'] or '-')}</p>"
                     f"<pre>{html.escape(format_question('', r['options']).strip())}</pre>"
                     f"<p>answer: <b>{html.escape(str(r['answer']))}</b>{truth} | {r['num_zooms']} zooms, "
                     f"{r['num_frames']} frames, stop {r['stop']}</p>")
        step = next((s for s in (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 1800, 3600) if duration / s <= 10), 7200)
        parts.append('<div class="timeline">' + "".join(
            f'<span class="tick" style="left:{100 * f.time / duration:.3f}%"></span>' for f in frames[:overview]) + "".join(
            f'<span class="second" style="left:{100 * s / duration:.3f}%">{s:g}s</span>'
            for s in range(0, int(duration) + 1, step)))
        for turn in r["turns"]:
            if turn["kind"] == "zoom":
                start, end = turn["segment"]
                parts.append(f'<span class="segment" data-segment="{start:.3f},{end:.3f}" title="{start:.2f}-{end:.2f}s" '
                             f'style="left:{100 * start / duration:.3f}%;width:{100 * (end - start) / duration:.3f}%"></span>')
        parts.append(f"</div><h4>overview ({overview} frames)</h4>{strip(frames[:overview], 'overview')}")
        used = overview
        for turn in r["turns"]:
            parts.append(f"<h4>turn {turn['turn']}: {turn['kind']}</h4><pre>{html.escape(turn['text'])}</pre>")
            if turn["kind"] == "zoom":
                returned = frames[used:used + turn["num_frames"]]
                used += turn["num_frames"]
                parts.append(f'<p>zoom {turn["segment"][0]:.2f}-{turn["segment"][1]:.2f}s at {turn["fps"]:g} fps</p>'
                             f'<div class="zoomframes" data-turn="{turn["turn"]}">{strip(returned, "zoom")}</div>')
            elif turn.get("error"):
                parts.append(f"<p>tool error: {html.escape(turn['error'])}</p>")
        parts.append("</section>")
    # Data URLs are base64 and the keys hex, so the JSON cannot close the script element early.
    parts.append(f'<script type="application/json" id="frames">{json.dumps(table)}</script>'
                 "<script>const frames = JSON.parse(document.getElementById('frames').textContent);"
                 "for (const img of document.querySelectorAll('img[data-frame]')) img.src = frames[img.dataset.frame];"
                 "</script>")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(parts))
    os.replace(tmp, path)


# -----------------------------------------------------------------------------
# Results: one JSON line per question, on disk as it ends


def read_results(path):
    """The records of a results JSONL; a line cut short by a kill (the last one) is dropped."""
    records = []
    if os.path.isfile(path):
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    records.append(json.loads(line))
                except ValueError:
                    pass
    return records


def public_fields(record):
    return {k: v for k, v in record.items() if not k.startswith("_")}
