"""The turn parser (docs/protocol.md "Assistant turns", "The zoom tool"), and what the episode does with
a rejected call: the parser picks the right one-line error, never raises, and the episode goes on.

Parser cases run against a 20 s video and the default budget of 16 frames per call, unless a case
lowers the budget (the budget is what is left of the episode's frames, so it can be anything >= 0).
"""
import random

import pytest

import plumbing
import vz

DURATION = 20.0
MAX_FRAMES = 16


def call(body):
    """A well-shaped turn whose only fault, if any, is in the JSON body."""
    return f"<think>Look closer.</think><video_zoom> {body} </video_zoom>"


VALID = '{"segment": [0, 4], "fps": 2}'

# (id, turn text, max_frames, substring that only the right error contains)
MALFORMED = [
    # -- the body is not a JSON object
    ("empty", call(""), MAX_FRAMES, "the call is empty"),  # nothing between the tags
    ("blank", "<think>x</think><video_zoom>\n \t </video_zoom>", MAX_FRAMES, "the call is empty"),  # whitespace only
    ("no_json", call("zoom to 12-18 s please"), MAX_FRAMES, "not valid JSON"),  # prose instead of JSON
    ("trailing_comma", call('{"segment": [0, 4], "fps": 2,}'), MAX_FRAMES, "not valid JSON"),
    ("single_quotes", call("{'segment': [0, 4], 'fps': 2}"), MAX_FRAMES, "not valid JSON"),  # Python, not JSON
    ("unclosed_brace", call('{"segment": [0, 4], "fps": 2'), MAX_FRAMES, "not valid JSON"),
    ("two_objects", call(VALID + " " + VALID), MAX_FRAMES, "not valid JSON"),  # extra data after the object
    ("deep_open", call("[" * 10000), MAX_FRAMES, "not valid JSON"),  # unclosed nesting 10000 deep
    ("deep_closed", call("[" * 10000 + "]" * 10000), MAX_FRAMES, "not valid JSON"),  # RecursionError, caught
    ("deep_in_segment", call('{"segment": ' + "[" * 10000 + "]" * 10000 + ', "fps": 1}'), MAX_FRAMES,
     "not valid JSON"),  # deep nesting inside an otherwise good object
    ("json_list", call("[0, 4, 2]"), MAX_FRAMES, "must be a JSON object"),  # arguments as a list
    ("json_number", call("12"), MAX_FRAMES, "must be a JSON object"),
    ("json_string", call('"segment 0-4 at 2 fps"'), MAX_FRAMES, "must be a JSON object"),
    ("json_null", call("null"), MAX_FRAMES, "must be a JSON object"),
    # -- keys
    ("missing_segment", call('{"fps": 2}'), MAX_FRAMES, 'missing the key "segment"'),
    ("missing_fps", call('{"segment": [0, 4]}'), MAX_FRAMES, 'missing the key "fps"'),
    ("missing_both", call("{}"), MAX_FRAMES, 'missing the key "segment"'),  # first missing key named
    ("misspelled_key", call('{"segments": [0, 4], "fps": 2}'), MAX_FRAMES, 'missing the key "segment"'),
    ("extra_key", call('{"segment": [0, 4], "fps": 2, "speed": 1}'), MAX_FRAMES, 'unexpected key "speed"'),
    # -- types: segment must be a list of exactly two numbers, booleans are not numbers
    ("segment_string", call('{"segment": "0-4", "fps": 2}'), MAX_FRAMES, '"segment" must be a list of two'),
    ("segment_object", call('{"segment": {"start": 0, "end": 4}, "fps": 2}'), MAX_FRAMES,
     '"segment" must be a list of two'),
    ("segment_number", call('{"segment": 4, "fps": 2}'), MAX_FRAMES, '"segment" must be a list of two'),
    ("segment_empty", call('{"segment": [], "fps": 2}'), MAX_FRAMES, '"segment" must be a list of two'),
    ("segment_one", call('{"segment": [4], "fps": 2}'), MAX_FRAMES, '"segment" must be a list of two'),
    ("segment_three", call('{"segment": [0, 4, 8], "fps": 2}'), MAX_FRAMES, '"segment" must be a list of two'),
    ("segment_strings", call('{"segment": ["0", "4"], "fps": 2}'), MAX_FRAMES, '"segment" must be a list of two'),
    ("segment_bools", call('{"segment": [false, true], "fps": 2}'), MAX_FRAMES,
     '"segment" must be a list of two'),  # bool is an int in Python, not a number here
    ("segment_null", call('{"segment": [null, 4], "fps": 2}'), MAX_FRAMES, '"segment" must be a list of two'),
    ("segment_nested", call('{"segment": [[0], [4]], "fps": 2}'), MAX_FRAMES, '"segment" must be a list of two'),
    ("segment_is_null", call('{"segment": null, "fps": 2}'), MAX_FRAMES, '"segment" must be a list of two'),
    ("fps_string", call('{"segment": [0, 4], "fps": "2"}'), MAX_FRAMES, '"fps" must be a number'),
    ("fps_true", call('{"segment": [0, 4], "fps": true}'), MAX_FRAMES, '"fps" must be a number'),  # True == 1
    ("fps_null", call('{"segment": [0, 4], "fps": null}'), MAX_FRAMES, '"fps" must be a number'),
    ("fps_list", call('{"segment": [0, 4], "fps": [2]}'), MAX_FRAMES, '"fps" must be a number'),
    # -- non-finite numbers (Python's json accepts NaN/Infinity; 1e999 overflows to inf)
    ("nan_start", call('{"segment": [NaN, 4], "fps": 2}'), MAX_FRAMES, "must be finite"),
    ("infinity_end", call('{"segment": [0, Infinity], "fps": 2}'), MAX_FRAMES, "must be finite"),
    ("minus_infinity_start", call('{"segment": [-Infinity, 4], "fps": 2}'), MAX_FRAMES, "must be finite"),
    ("overflow_end", call('{"segment": [0, 1e999], "fps": 2}'), MAX_FRAMES, "must be finite"),
    ("nan_fps", call('{"segment": [0, 4], "fps": NaN}'), MAX_FRAMES, "must be finite"),
    ("infinity_fps", call('{"segment": [0, 4], "fps": Infinity}'), MAX_FRAMES, "must be finite"),
    ("overflow_fps", call('{"segment": [0, 4], "fps": 1e999}'), MAX_FRAMES, "must be finite"),
    # -- range
    ("negative_start", call('{"segment": [-1, 4], "fps": 2}'), MAX_FRAMES, "start -1s is negative"),
    ("negative_both", call('{"segment": [-4, -1], "fps": 2}'), MAX_FRAMES, "is negative"),  # checked first
    ("start_equals_end", call('{"segment": [5, 5], "fps": 2}'), MAX_FRAMES, "start 5s must be before its end 5s"),
    ("start_after_end", call('{"segment": [15, 12], "fps": 2}'), MAX_FRAMES, "start 15s must be before its end 12s"),
    ("start_at_duration", call('{"segment": [20, 25], "fps": 2}'), MAX_FRAMES,
     "at or past the end of the video (20.00s)"),
    ("start_past_duration", call('{"segment": [30, 40], "fps": 2}'), MAX_FRAMES, "start 30s is at or past the end"),
    ("fps_zero", call('{"segment": [0, 4], "fps": 0}'), MAX_FRAMES, "fps must be positive, got 0"),
    ("fps_negative", call('{"segment": [0, 4], "fps": -2}'), MAX_FRAMES, "fps must be positive, got -2"),
    # -- frame count n = int(fps * span) on the clamped span, 1..budget
    ("zero_frames", call('{"segment": [0, 4], "fps": 0.2}'), MAX_FRAMES, "asks for 0 frames"),  # 0.8 -> 0
    ("zero_frames_after_clamp", call('{"segment": [19.5, 100], "fps": 1}'), MAX_FRAMES,
     "asks for 0 frames"),  # 80.5 frames asked, but the clamped span holds 0.5
    ("subnormal_fps", call('{"segment": [0, 4], "fps": 1e-320}'), MAX_FRAMES, "asks for 0 frames"),
    ("over_budget", call('{"segment": [0, 10], "fps": 30}'), MAX_FRAMES, "asks for 300 frames but at most 16"),
    ("over_budget_after_clamp", call('{"segment": [10, 1000], "fps": 2}'), MAX_FRAMES,
     "asks for 20 frames but at most 16"),  # counted on [10, 20], not [10, 1000]
    ("over_lowered_budget", call('{"segment": [0, 5], "fps": 1}'), 4, "asks for 5 frames but at most 4"),
    ("budget_used_up", call('{"segment": [0, 1], "fps": 1}'), 0, "at most 0"),  # episode's frames all spent
    ("huge_fps", call('{"segment": [0, 10], "fps": 1e308}'), MAX_FRAMES,
     "but at most 16"),  # fps * span overflows to inf: still "too many frames", not a crash
    # -- tags
    ("two_calls", call(VALID) + "<video_zoom> " + VALID + " </video_zoom>", MAX_FRAMES, "more than one"),
    ("nested_tags", "<think>x</think><video_zoom> <video_zoom> " + VALID + " </video_zoom> </video_zoom>",
     MAX_FRAMES, "more than one"),
    ("two_opens_one_close", "<think>x</think><video_zoom> <video_zoom> " + VALID + " </video_zoom>", MAX_FRAMES,
     "more than one"),
    ("close_before_open", "<think>x</think></video_zoom> " + VALID + " <video_zoom>", MAX_FRAMES,
     "must be written <video_zoom>"),
    ("unclosed_open", "<think>x</think><video_zoom> " + VALID, MAX_FRAMES, "must be written <video_zoom>"),
    ("close_only", "<think>x</think>" + VALID + " </video_zoom>", MAX_FRAMES, "must be written <video_zoom>"),
    ("call_then_answer", call(VALID) + "<answer>A</answer>", MAX_FRAMES, "not both"),
    ("answer_then_call", "<think>x</think><answer>A</answer>" + call(VALID), MAX_FRAMES, "not both"),
    ("answer_inside_call", "<think>x</think><video_zoom> <answer>A</answer> </video_zoom>", MAX_FRAMES,
     "not both"),
]


@pytest.mark.parametrize("text,max_frames,expected", [case[1:] for case in MALFORMED],
                         ids=[case[0] for case in MALFORMED])
def test_malformed_call_gives_the_right_one_line_error(text, max_frames, expected):
    action, format_ok = vz.parse_turn(text, DURATION, max_frames)
    assert isinstance(action, vz.Invalid), action
    assert "\n" not in action.error and action.error.strip() == action.error
    assert expected in action.error, action.error
    assert format_ok is False  # a call the tool rejects never counts as well-formed


# Integers too big for a float: either answer is fine (clamp, "not finite", "not valid JSON", ...),
# as long as it is a one-line error and no exception.
OVERFLOW = [
    ("int_end_400_digits", call('{"segment": [0, 1%s], "fps": 1}' % ("0" * 400))),  # float() overflows
    ("int_fps_400_digits", call('{"segment": [0, 4], "fps": 1%s}' % ("0" * 400))),
    ("int_start_400_digits", call('{"segment": [1%s, 4], "fps": 1}' % ("0" * 400))),
    ("int_5000_digits", call('{"segment": [0, 1%s], "fps": 1}' % ("0" * 5000))),  # json's int digit limit
]


@pytest.mark.parametrize("text", [case[1] for case in OVERFLOW], ids=[case[0] for case in OVERFLOW])
def test_integers_beyond_float_range_are_rejected(text):
    action, format_ok = vz.parse_turn(text, DURATION, MAX_FRAMES)
    assert isinstance(action, vz.Invalid) and "\n" not in action.error and not format_ok, action


# (id, turn text, expected Zoom(start, end, fps, num_frames, requested_end, clamped), format_ok)
VALID_CALLS = [
    ("integers", call('{"segment": [0, 4], "fps": 2}'), vz.Zoom(0.0, 4.0, 2.0, 8, 4.0, False), True),
    ("floats", call('{"segment": [12.5, 14.25], "fps": 4.0}'), vz.Zoom(12.5, 14.25, 4.0, 7, 14.25, False), True),
    ("exponents", call('{"segment": [1e0, 5E0], "fps": 2.5e0}'), vz.Zoom(1.0, 5.0, 2.5, 10, 5.0, False), True),
    ("fractional_count", call('{"segment": [0, 5], "fps": 0.7}'),
     vz.Zoom(0.0, 5.0, 0.7, 3, 5.0, False), True),  # int(3.5) = 3: floor, not round
    ("one_frame", call('{"segment": [3, 4], "fps": 1}'), vz.Zoom(3.0, 4.0, 1.0, 1, 4.0, False), True),
    ("exactly_the_budget", call('{"segment": [0, 8], "fps": 2}'), vz.Zoom(0.0, 8.0, 2.0, 16, 8.0, False), True),
    ("keys_reversed", call('{"fps": 2, "segment": [6, 8]}'), vz.Zoom(6.0, 8.0, 2.0, 4, 8.0, False), True),
    ("end_at_duration", call('{"segment": [10, 20], "fps": 1}'),
     vz.Zoom(10.0, 20.0, 1.0, 10, 20.0, False), True),  # exactly the end: not clamped
    ("end_clamped", call('{"segment": [10, 30], "fps": 0.5}'),
     vz.Zoom(10.0, 20.0, 0.5, 5, 30.0, True), True),  # n on [10, 20]: 5, not 10
    ("end_clamped_floats", call('{"segment": [19.0, 20.5], "fps": 10}'),
     vz.Zoom(19.0, 20.0, 10.0, 10, 20.5, True), True),
    ("start_just_before_end", call('{"segment": [19.75, 25], "fps": 8}'),
     vz.Zoom(19.75, 20.0, 8.0, 2, 25.0, True), True),
    ("whitespace_and_newlines", "<think>a\nb</think>\n<video_zoom>\n  {\n  \"segment\" : [ 2 , 6 ] ,\n"
     "  \"fps\" : 1.5\n}\n</video_zoom>\n", vz.Zoom(2.0, 6.0, 1.5, 6, 6.0, False), True),
    ("no_spaces", '<think>x</think><video_zoom>{"segment":[2,6],"fps":1}</video_zoom>',
     vz.Zoom(2.0, 6.0, 1.0, 4, 6.0, False), True),
    # format: the call is executed either way, but only the exact shape earns the format reward
    ("no_think", '<video_zoom> {"segment": [0, 4], "fps": 2} </video_zoom>',
     vz.Zoom(0.0, 4.0, 2.0, 8, 4.0, False), False),
    ("text_after_call", call('{"segment": [0, 4], "fps": 2}') + " then I will answer",
     vz.Zoom(0.0, 4.0, 2.0, 8, 4.0, False), False),
    ("text_between", '<think>x</think> so: <video_zoom> {"segment": [0, 4], "fps": 2} </video_zoom>',
     vz.Zoom(0.0, 4.0, 2.0, 8, 4.0, False), False),
    ("unclosed_think", '<think>x <video_zoom> {"segment": [0, 4], "fps": 2} </video_zoom>',
     vz.Zoom(0.0, 4.0, 2.0, 8, 4.0, False), False),
    ("two_thinks", '<think>x</think><think>y</think><video_zoom> {"segment": [0, 4], "fps": 2} </video_zoom>',
     vz.Zoom(0.0, 4.0, 2.0, 8, 4.0, False), False),
]


@pytest.mark.parametrize("text,expected,format_ok", [case[1:] for case in VALID_CALLS],
                         ids=[case[0] for case in VALID_CALLS])
def test_valid_call(text, expected, format_ok):
    action = vz.parse_turn(text, DURATION, MAX_FRAMES)
    assert action == (expected, format_ok)
    assert type(action[0].num_frames) is int and type(action[0].clamped) is bool


# (id, turn text, expected action: None, or (answer text, letter), format_ok)
ANSWERS = [
    ("letter", "<think>x</think><answer>B</answer>", ("B", "B"), True),
    ("boxed", "<think>x</think><answer>\\boxed{C}</answer>", ("C", "C"), True),
    ("boxed_in_prose", "<think>x</think><answer>The answer is \\boxed{C}.</answer>", ("C", "C"), True),
    ("letter_and_option", "<think>x</think><answer>B. a square</answer>", ("B. a square", "B"), True),
    ("parenthesised", "<think>x</think><answer>(D)</answer>", ("(D)", "D"), True),
    ("letter_paren", "<think>x</think><answer>D) nothing</answer>", ("D) nothing", "D"), True),
    ("letter_colon", "<think>x</think><answer>A: a circle</answer>", ("A: a circle", "A"), True),
    ("padded", "<think>x</think>\n<answer>\n  A \n</answer>\n", ("A", "A"), True),
    ("lowercase", "<think>x</think><answer>b</answer>", ("b", None), True),  # letters are capitals
    ("no_letter", "<think>x</think><answer>a square</answer>", ("a square", None), True),
    ("sentence", "<think>x</think><answer>The answer is B</answer>", ("The answer is B", None), True),
    ("word", "<think>x</think><answer>Answer: B</answer>", ("Answer: B", None), True),  # "A" of "Answer"
    ("empty_answer", "<think>x</think><answer></answer>", ("", None), True),
    ("no_think", "<answer>B</answer>", ("B", "B"), False),  # read, but not well-formed
    ("text_after_answer", "<think>x</think><answer>B</answer> done", ("B", "B"), False),
    # no <answer>: the episode ends and no letter is searched for anywhere else
    ("reasoning_only", "<think>the answer is B</think>", None, False),
    ("bare_letter", "B", None, False),
    ("boxed_outside", "<think>x</think>\\boxed{B}", None, False),
    ("empty_turn", "", None, False),
    ("unclosed_answer", "<think>x</think><answer>B", None, False),
    ("close_only", "<think>x</think>B</answer>", None, False),
]


@pytest.mark.parametrize("text,expected,format_ok", [case[1:] for case in ANSWERS],
                         ids=[case[0] for case in ANSWERS])
def test_answer(text, expected, format_ok):
    action, ok = vz.parse_turn(text, DURATION, MAX_FRAMES)
    if expected is None:
        assert action is None
    else:
        assert isinstance(action, vz.Answer) and (action.text, action.letter) == expected
    assert ok is format_ok


FRAGMENTS = ["<think>", "</think>", "<video_zoom>", "</video_zoom>", "<answer>", "</answer>", '{"segment": [',
             "]", ", ", '"fps":', "}", "{", "[", '"', "\\boxed{", "B", "A. ", "\n", " ", "NaN", "Infinity",
             "-", "true", "null", "<|im_end|>", "<tool_response>", "é", "😀", "\u200b", "\x00"]
# Plain numbers per slot (start, end, fps) make many calls valid; odd ones hit every check.
PLAIN_NUMBERS = (["0", "1", "2.5", "4", "12"], ["4", "5", "8", "14.5", "30"], ["0.5", "1", "2"])
ODD_NUMBERS = ["-1", "0", "20", "1e999", "1e308", "1e-320", "0.0001", "99999999999999999999", "1" + "0" * 400,
               "-0", "3.", ".5", "1e", "0x10", "NaN", "Infinity", "true", '"2"']


def random_number(rng, slot=None):
    if slot is not None and rng.random() < 0.7:
        return rng.choice(PLAIN_NUMBERS[slot])
    return rng.choice(ODD_NUMBERS)


def random_turn(rng):
    """Mostly protocol-shaped turns with a few mutations; some pure fragment soup."""
    if rng.random() < 0.6:
        if rng.random() < 0.75:
            pieces = ["<think>", "why", "</think>", "<video_zoom>", '{"segment": [', random_number(rng, 0), ", ",
                      random_number(rng, 1), "], ", '"fps": ', random_number(rng, 2), "}", "</video_zoom>"]
        else:
            pieces = ["<think>", "why", "</think>", "<answer>", rng.choice(["B", "\\boxed{C}", "b", ""]), "</answer>"]
        for _ in range(rng.choice([0, 0, 1, 2, 3])):
            i = rng.randrange(len(pieces))
            mutation = rng.randrange(4)
            if mutation == 0:
                del pieces[i]
            elif mutation == 1:
                pieces.insert(i, pieces[i])
            elif mutation == 2:
                pieces.insert(i, rng.choice(FRAGMENTS) if rng.random() < 0.5 else random_number(rng))
            else:
                j = rng.randrange(len(pieces))
                pieces[i], pieces[j] = pieces[j], pieces[i]
    else:
        pieces = [rng.choice(FRAGMENTS) if rng.random() < 0.7 else random_number(rng)
                  for _ in range(rng.randrange(30))]
        pieces += [chr(rng.randrange(0x20, 0x3000)) for _ in range(rng.randrange(3))]
    return "".join(pieces)


def test_parse_turn_never_raises():
    rng = random.Random(0)
    kinds = set()
    for _ in range(500):
        text = random_turn(rng)
        budget = rng.choice([0, 4, 16, 16])
        action, format_ok = vz.parse_turn(text, DURATION, budget)
        assert action is None or isinstance(action, (vz.Zoom, vz.Answer, vz.Invalid)), text
        assert isinstance(format_ok, bool), text
        kinds.add(type(action).__name__)
        if format_ok:
            assert isinstance(action, (vz.Zoom, vz.Answer)), text
        if isinstance(action, vz.Invalid):
            assert action.error and "\n" not in action.error, text
        if isinstance(action, vz.Zoom):  # whatever got through is within the protocol's ranges
            assert 0 <= action.start < action.end <= DURATION, text
            assert 1 <= action.num_frames <= budget, text
            assert action.num_frames == vz.frame_count(action.fps, action.end - action.start), text
    assert kinds == {"Zoom", "Answer", "Invalid", "NoneType"}  # the generator reaches every outcome


# -----------------------------------------------------------------------------
# The episode goes on after a rejected call


@pytest.fixture(scope="module")
def episode_setup(tiny, index_video):
    _, renderer = tiny
    with plumbing.open_video(index_video) as video:
        prompt = vz.build_prompt(renderer, video, "q?", ["A. x", "B. y"], vz.Limits(), overview_fps=0.25)
        yield renderer, video, prompt


ANSWER_A = "<think>ok</think><answer>A</answer>"
EPISODE_CASES = ["empty", "no_json", "trailing_comma", "json_list", "missing_fps", "extra_key", "segment_bools",
                 "nan_start", "negative_start", "start_after_end", "start_past_duration", "fps_zero",
                 "zero_frames", "over_budget", "two_calls", "close_before_open", "unclosed_open",
                 "call_then_answer", "deep_closed"]


@pytest.mark.parametrize("case", EPISODE_CASES)
def test_rejected_call_becomes_an_error_turn(episode_setup, case):
    renderer, video, prompt = episode_setup
    (bad,) = [text for name, text, _, _ in MALFORMED if name == case]
    limits = vz.Limits()
    budget = min(limits.max_frames_per_call, limits.max_frames - len(prompt.frames))
    expected, _ = vz.parse_turn(bad, video.duration, budget)
    episode = vz.replay(renderer, video, prompt, [bad, ANSWER_A], limits)

    first, second = episode.turns
    assert first["kind"] == "invalid" and first["error"] == expected.error
    assert first["reply"].startswith("<|im_start|>user\n<tool_response>Error: " + expected.error)
    assert vz.FIX_CALL in first["reply"] and vz.LAST_TURN not in first["reply"]
    assert second["kind"] == "answer" and episode.stop == "answer" and episode.answer.letter == "A"
    assert episode.num_zooms == 0 and len(episode.frames) == len(prompt.frames)
    # Mask: prompt 0, the bad turn 1, the environment's reply (closing <|im_end|>, tool response, next
    # header) 0, the answer turn (with its <|im_end|>) 1.
    num_bad = len(renderer.encode(bad)) + (vz.ZOOM_CLOSE not in bad)
    num_answer = len(renderer.encode(ANSWER_A)) + 1
    start, end = len(prompt.ids) + num_bad, len(episode.ids) - num_answer
    assert len(episode.ids) == len(episode.mask)
    assert episode.mask[:len(prompt.ids)] == prompt.mask
    assert all(m == 1 for m in episode.mask[len(prompt.ids):start])
    assert end > start and all(m == 0 for m in episode.mask[start:end])
    assert all(m == 1 for m in episode.mask[end:])
    assert expected.error in renderer.decode(episode.ids[start:end])


ZOOM = call('{"segment": [0, 4], "fps": 2}')


def test_reply_before_the_last_turn_says_so(episode_setup):
    renderer, video, prompt = episode_setup
    # max_turns=2: after one zoom the next turn is the last one; with 3 it is not.
    last = vz.replay(renderer, video, prompt, [ZOOM, ANSWER_A], vz.Limits(max_turns=2))
    assert last.turns[0]["kind"] == "zoom" and last.turns[0]["num_frames"] == 8
    assert vz.LAST_TURN in last.turns[0]["reply"] and vz.CONTINUE not in last.turns[0]["reply"]
    assert last.stop == "answer"
    not_last = vz.replay(renderer, video, prompt, [ZOOM, ANSWER_A], vz.Limits(max_turns=3))
    assert vz.CONTINUE in not_last.turns[0]["reply"] and vz.LAST_TURN not in not_last.turns[0]["reply"]
    # A rejected call before the last turn gets the last-turn sentence instead of "fix the call".
    rejected = vz.replay(renderer, video, prompt, [call("{}"), ANSWER_A], vz.Limits(max_turns=2))
    assert rejected.turns[0]["kind"] == "invalid"
    assert vz.LAST_TURN in rejected.turns[0]["reply"] and vz.FIX_CALL not in rejected.turns[0]["reply"]


def test_call_on_the_last_turn_is_not_executed(episode_setup):
    renderer, video, prompt = episode_setup
    episode = vz.replay(renderer, video, prompt, [ZOOM, ZOOM], vz.Limits(max_turns=2))
    assert [t["kind"] for t in episode.turns] == ["zoom", "late_call"]
    assert episode.stop == "max_turns" and episode.answer is None and episode.num_zooms == 1
    assert len(episode.frames) == len(prompt.frames) + 8  # the second call returned nothing
    # Nothing follows the late call: no closing <|im_end|>, no tool response, no assistant header.
    assert "reply" not in episode.turns[1]
    num_late = len(renderer.encode(ZOOM))
    assert renderer.decode(episode.ids[-num_late:]) == ZOOM and episode.mask[-num_late:] == [1] * num_late
    with pytest.raises(ValueError, match="after the episode ended"):
        vz.replay(renderer, video, prompt, [ZOOM, ZOOM, ANSWER_A], vz.Limits(max_turns=2))
