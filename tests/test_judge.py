"""`lmforge judge`: the statistics against hand computations, and both voting UIs on real tiny checkpoints."""

import _thread
import argparse
import http.client as http_client
import io
import json
import shutil
import math
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from statistics import NormalDist

import pytest

from lmforge.errors import LmforgeError
from lmforge.evaluation.judge import (
    JudgingSession,
    add_judge_parser,
    bootstrap_rating_intervals,
    bradley_terry_ratings,
    default_out_dir,
    judge_in_terminal,
    make_judge_server,
    pairwise_table,
    ratings_need_prior,
    read_prompts,
    read_votes,
    resolve_contenders,
    run_judge,
    sanitize,
    schedule_pairs,
    unique_names,
    wilson_interval,
)

PROMPTS = "The json module\n\nA list is\nThe class\n"  # short: the tiny model's context is 64 tokens


def parse(*argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lmforge")
    add_judge_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["judge", *map(str, argv)])


def vote(left, right, winner, prompt_index=0):
    return {"prompt_index": prompt_index, "left": left, "right": right, "winner": winner}


@pytest.fixture(scope="module")
def checkpoints(trained_run):
    found = sorted((trained_run / "checkpoints").glob("step_*"))
    assert len(found) >= 2
    return found[-2:]


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text(PROMPTS, encoding="utf-8")
    return path


# Statistics.

def test_wilson_interval_matches_the_formula():
    z = NormalDist().inv_cdf(0.975)
    n, p = 10, 0.7
    centre = (p + z**2 / (2 * n)) / (1 + z**2 / n)
    half = z / (1 + z**2 / n) * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2))
    assert wilson_interval(7, 10) == pytest.approx((centre - half, centre + half), abs=1e-12)
    assert wilson_interval(7, 10) == pytest.approx((0.3968, 0.8922), abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    low, high = wilson_interval(5, 5)
    assert high == 1.0 and 0.5 < low < 1.0  # a clean sweep still leaves doubt, unlike a bootstrap


def test_ties_count_as_half_a_win():
    # a against b: 6 wins, 2 ties, 2 losses, shown either side -> 7 of 10; one vote of another pair is not counted.
    votes = ([vote("a", "b", "a")] * 3 + [vote("b", "a", "a")] * 3 + [vote("a", "b", "tie"), vote("b", "a", "tie")]
             + [vote("b", "a", "b")] * 2 + [vote("a", "c", "c")])
    row = pairwise_table(votes, ["a", "b", "c"])[0]
    assert (row["a"], row["b"], row["a_wins"], row["b_wins"], row["ties"], row["votes"]) == ("a", "b", 6, 2, 2, 10)
    assert row["a_win_rate"] == pytest.approx(0.7)
    assert row["a_win_rate_interval"] == pytest.approx(list(wilson_interval(7, 10)))
    unplayed = pairwise_table(votes, ["a", "b", "c"])[2]
    assert (unplayed["a"], unplayed["b"], unplayed["votes"], unplayed["a_win_rate"]) == ("b", "c", 0, None)


def test_bradley_terry_two_models_three_wins_of_four():
    votes = [vote("a", "b", "a"), vote("b", "a", "a"), vote("a", "b", "a"), vote("a", "b", "b")]
    ratings = bradley_terry_ratings(votes, ["a", "b"])
    # Odds of 3:1 on the Elo scale: 400 * log10(3), split evenly around the mean of 1000.
    assert ratings["a"] - ratings["b"] == pytest.approx(400 * math.log10(3), abs=1e-6)
    assert ratings["a"] - ratings["b"] == pytest.approx(190.85, abs=0.01)
    assert (ratings["a"] + ratings["b"]) / 2 == pytest.approx(1000)
    # Two wins and two ties is the same 3 of 4 once a tie is half a win each way.
    with_ties = bradley_terry_ratings([vote("a", "b", "a"), vote("a", "b", "a"), vote("a", "b", "tie"), vote("b", "a", "tie")], ["a", "b"])
    assert with_ties["a"] - with_ties["b"] == pytest.approx(400 * math.log10(3), abs=1e-6)


def test_bradley_terry_orders_three_models_transitively():
    # strong beats middle 3-1, middle beats weak 3-1, strong beats weak 4-1.
    votes = ([vote("strong", "middle", "strong")] * 3 + [vote("middle", "strong", "middle")]
             + [vote("weak", "middle", "middle")] * 3 + [vote("middle", "weak", "weak")]
             + [vote("strong", "weak", "strong")] * 4 + [vote("weak", "strong", "weak")])
    names = ["weak", "strong", "middle"]
    ratings = bradley_terry_ratings(votes, names)
    assert ratings["strong"] > ratings["middle"] > ratings["weak"]
    assert sum(ratings.values()) / 3 == pytest.approx(1000)
    assert not ratings_need_prior(votes, names)
    # At the maximum of the likelihood each model's expected wins equal its actual wins (the score equations).
    games = {("strong", "middle"): 4, ("middle", "weak"): 4, ("strong", "weak"): 5}
    wins = {"strong": 7, "middle": 4, "weak": 2}
    for name in names:
        expected = sum(n / (1 + 10 ** ((ratings[b if a == name else a] - ratings[name]) / 400))
                       for (a, b), n in games.items() if name in (a, b))
        assert expected == pytest.approx(wins[name], abs=1e-6)
    intervals = bootstrap_rating_intervals(votes, names, samples=300, seed=1)
    for name in names:
        low, high = intervals[name]
        assert low < ratings[name] < high
    assert intervals == bootstrap_rating_intervals(votes, names, samples=300, seed=1)  # seeded
    assert intervals != bootstrap_rating_intervals(votes, names, samples=300, seed=2)


def test_ratings_stay_finite_when_a_model_never_loses():
    votes = [vote("a", "b", "a"), vote("b", "c", "b"), vote("a", "c", "a")]
    assert ratings_need_prior(votes, ["a", "b", "c"])
    ratings = bradley_terry_ratings(votes, ["a", "b", "c"])
    assert all(math.isfinite(value) for value in ratings.values())
    assert ratings["a"] > ratings["b"] > ratings["c"]


def test_every_pair_on_every_prompt_once_in_a_seeded_order():
    names = ["a", "b", "c"]
    pairs = schedule_pairs(names, 4, seed=5)
    assert len(pairs) == 4 * 3 and len({pair.key for pair in pairs}) == 12
    assert [pair.id for pair in pairs] == list(range(12))
    assert pairs == schedule_pairs(names, 4, seed=5)
    assert pairs != schedule_pairs(names, 4, seed=6)
    assert {pair.left for pair in pairs} == set(names)  # placement is drawn, not fixed by argument order
    assert [pair.prompt_index for pair in pairs] != sorted(pair.prompt_index for pair in pairs)


def test_repeated_names_are_numbered_and_name_the_default_folder():
    assert unique_names(["run-step20", "run-step30", "run-step30"]) == ["run-step20", "run-step30-1", "run-step30-2"]
    assert default_out_dir(["run-step20", "my run-step30"]) == Path("judgements/run-step20-vs-my_run-step30")
    many = default_out_dir([f"a-long-run-name-step{n}" for n in range(10)])
    assert len(many.name) < 100 and many.name.startswith("a-long-run-name-step0-vs-a-long-run-name-step1-and-8-more-")


# Inputs and files.

def test_prompts_from_text_and_jsonl(tmp_path):
    text = tmp_path / "p.txt"
    text.write_text("first\n\n  second with spaces\n", encoding="utf-8")
    assert read_prompts(text) == ["first", "  second with spaces"]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "one"}\n\n{"prompt": "two", "id": 7}\n', encoding="utf-8")
    assert read_prompts(jsonl) == ["one", "two"]


@pytest.mark.parametrize("content, fragment", [('{"prompt": "ok"}\n{"prompt": \n', "p.jsonl:2: not valid JSON"),
                                               ('{"prompt": "ok"}\n\n{"text": "x"}\n', "p.jsonl:3: missing field 'prompt'"),
                                               ('{"prompt": 5}\n', "p.jsonl:1: field 'prompt' must be a string"),
                                               ("\n\n", "holds no prompts"), ("[1, 2]\n", "p.jsonl:1: expected a JSON object")])
def test_bad_prompt_files_name_the_line(tmp_path, content, fragment):
    path = tmp_path / "p.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(LmforgeError, match=fragment.replace("(", r"\(")):
        read_prompts(path)


def test_an_interrupted_last_vote_line_is_dropped(tmp_path):
    path = tmp_path / "votes.jsonl"
    path.write_text(json.dumps(vote("a", "b", "a")) + "\n" + '{"prompt_index": 1, "le', encoding="utf-8")
    assert read_votes(path) == [vote("a", "b", "a")]
    session = JudgingSession(tmp_path, ["a", "b"], ["p", "q"], {(n, i): "x" for n in "ab" for i in (0, 1)}, seed=0)
    pair = session.next_pair()
    session.vote(pair.id, "tie")
    assert len(read_votes(path)) == 2 and path.read_text(encoding="utf-8").count("\n") == 2
    path.write_text(path.read_text(encoding="utf-8") + "not json\n" + json.dumps(vote("a", "b", "b")) + "\n", encoding="utf-8")
    with pytest.raises(LmforgeError, match="votes.jsonl:3: not a vote"):
        read_votes(path)


def test_sanitize_makes_escape_sequences_and_controls_inert():
    evil = "ok\x1b[2J\x1b[31mred\x1b]0;title\x07 back\rspace\x08 bell\x07 \x9b31m rtl\u202e end\ttab\nline"
    clean = sanitize(evil)
    assert not any(ch in clean for ch in "\x1b\r\x08\x07\x9b\u202e")
    assert "ok" in clean and "red" in clean and "\ttab\nline" in clean and "title" not in clean


def test_bad_command_lines(tmp_path, checkpoints, prompts_file):
    a, b = checkpoints
    with pytest.raises(LmforgeError, match="at least two models"):
        run_judge(parse(a, "--prompts", prompts_file))
    with pytest.raises(LmforgeError, match="are the same checkpoint"):
        resolve_contenders([checkpoints[-1], checkpoints[-1].parent.parent])  # a run folder is its latest checkpoint
    with pytest.raises(LmforgeError, match="given twice"):
        resolve_contenders([a, a.parent / ".." / a.parent.name / a.name])
    with pytest.raises(LmforgeError, match="prompts file not found"):
        run_judge(parse(a, b, "--prompts", tmp_path / "missing.txt", "--out", tmp_path / "out"))
    with pytest.raises(LmforgeError, match="--prompts FILE"):
        run_judge(parse(a, b, "--out", tmp_path / "out"))
    with pytest.raises(LmforgeError, match="no votes to report on"):
        run_judge(parse("--report-only", "--out", tmp_path / "nothing"))
    with pytest.raises(LmforgeError, match="max_new_tokens"):
        run_judge(parse(a, b, "--prompts", prompts_file, "--max-new-tokens", 0))
    with pytest.raises(SystemExit):
        parse(a, b, "--ui", "gui")
    assert not (tmp_path / "out").exists()


def test_help_explains_the_command():
    parser = argparse.ArgumentParser(prog="lmforge")
    judge = add_judge_parser(parser.add_subparsers(dest="command"))
    text = judge.format_help()
    for fragment in ("--prompts FILE", "./judgements/<model-a>-vs-<model-b>", "answers.jsonl", "votes.jsonl", "Wilson",
                     "Bradley-Terry", "--report-only", "--ui {terminal,browser}", "default 0.7"):
        assert fragment in text, fragment


# The terminal, on real checkpoints.

class InterruptingInput(io.StringIO):
    """Gives its lines, then Ctrl-C."""

    def readline(self, *args):
        line = super().readline(*args)
        if not line:
            raise KeyboardInterrupt
        return line


def secrets_of(contenders) -> list[str]:
    return [text for c in contenders for text in (c.name, str(c.path), str(c.checkpoint), c.checkpoint.name)]


def test_terminal_votes_resume_and_stay_blind(tmp_path, checkpoints, prompts_file, monkeypatch, capsys):
    a, b = checkpoints
    out = tmp_path / "judged"
    argv = [a, b, "--prompts", prompts_file, "--out", out, "--max-new-tokens", 8, "--seed", 3, "--bootstrap-samples", 50]
    contenders = resolve_contenders([a, b])
    names = [c.name for c in contenders]
    assert names == [f"{a.parent.parent.name}-step{int(a.name.split('_')[1])}", f"{b.parent.parent.name}-step{int(b.name.split('_')[1])}"]
    schedule = schedule_pairs(names, 3, seed=3)

    monkeypatch.setattr(sys, "stdin", io.StringIO("maybe\n1\nt\n"))  # a typo, answer 1, a tie, then end of input
    assert run_judge(parse(*argv)) == 0
    captured = capsys.readouterr()
    judging, results = captured.out.split("\nResults (", 1)
    assert judging.count("Which answer is better? 1 / 2 / t(ie) / s(kip) / q(uit)") == 4
    assert "please type 1, 2, t, s or q (got 'maybe')" in judging and "end of input" in judging
    for secret in secrets_of(contenders):
        assert secret not in judging and secret not in captured.err
    assert "generating answers: model 1 of 2, 3 prompts" in captured.err

    answers = {(r["model"], r["prompt_index"]): r["answer"] for r in map(json.loads, (out / "answers.jsonl").read_text().splitlines())}
    assert len(answers) == 6
    first = schedule[0]  # Answer 1 is the model drawn for the left, Answer 2 the other
    assert f"{' Answer 1 ':-^72}\n{sanitize(answers[first.left, first.prompt_index])}\n{' Answer 2 ':-^72}\n" in judging

    votes = [json.loads(line) for line in (out / "votes.jsonl").read_text().splitlines()]
    assert [(v["prompt_index"], v["left"], v["right"], v["winner"]) for v in votes] == [
        (schedule[0].prompt_index, schedule[0].left, schedule[0].right, schedule[0].left),
        (schedule[1].prompt_index, schedule[1].left, schedule[1].right, "tie")]
    report = json.loads((out / "report.json").read_text())
    (row,) = report["pairwise"]
    wins_of_a = int(schedule[0].left == names[0])
    assert (row["a"], row["b"], row["a_wins"], row["b_wins"], row["ties"], row["votes"]) == (
        names[0], names[1], wins_of_a, 1 - wins_of_a, 1, 2)
    assert row["a_win_rate"] == pytest.approx((wins_of_a + 0.5) / 2)
    assert report["ratings"] is None and "2 votes (1 ties) of 3 pairs" in results and (out / "report.md").exists()

    # The same command again: answers reused, only the unjudged pair is asked, then everything is judged.
    monkeypatch.setattr(sys, "stdin", io.StringIO("2\n"))
    assert run_judge(parse(*argv)) == 0
    captured = capsys.readouterr()
    assert "reusing the saved answers" in captured.err and "generating" not in captured.err
    assert captured.out.count("Which answer is better?") == 1 and "Pair 3 of 3" in captured.out and "All 3 pairs judged." in captured.out
    votes = read_votes(out / "votes.jsonl")
    assert len(votes) == 3 and {(v["prompt_index"], frozenset((v["left"], v["right"]))) for v in votes} == {p.key for p in schedule}
    assert votes[2]["winner"] == schedule[2].right

    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert run_judge(parse(*argv)) == 0
    assert "Which answer" not in capsys.readouterr().out

    # --report-only rebuilds the report from votes.jsonl alone.
    before = json.loads((out / "report.json").read_text())
    (out / "report.json").unlink()
    (out / "report.md").unlink()
    assert run_judge(parse("--report-only", "--out", out, "--bootstrap-samples", 50)) == 0
    after = json.loads((out / "report.json").read_text())
    assert after["pairwise"] == before["pairwise"] and after["models"] == before["models"] and (out / "report.md").exists()
    assert "report:" in capsys.readouterr().out


def test_changed_settings_make_new_answers_and_set_old_votes_aside(tmp_path, checkpoints, prompts_file, monkeypatch, capsys):
    a, b = checkpoints
    out = tmp_path / "judged"
    argv = [a, b, "--prompts", prompts_file, "--out", out, "--max-new-tokens", 6, "--bootstrap-samples", 20]
    monkeypatch.setattr(sys, "stdin", io.StringIO("1\nq\n"))
    run_judge(parse(*argv))
    old_votes = (out / "votes.jsonl").read_text()
    capsys.readouterr()

    monkeypatch.setattr(sys, "stdin", InterruptingInput("2\n"))  # one vote, then Ctrl-C
    assert run_judge(parse(*argv, "--temperature", 0)) == 0
    captured = capsys.readouterr()
    assert "the saved answers do not match (changed: temperature); generating new ones" in captured.err
    (archived,) = out.glob("votes.before-*.jsonl")
    assert archived.read_text() == old_votes
    assert "interrupted: stopping" in captured.out and "\nResults (1 votes this session)" in captured.out
    assert len(read_votes(out / "votes.jsonl")) == 1
    assert json.loads((out / "manifest.json").read_text())["config"]["temperature"] == 0


def test_terminal_never_shows_raw_control_characters(tmp_path):
    answers = {("m-a", 0): "fine\x1b[2J\x1b]0;owned\x07", ("m-b", 0): "over\rwrite\x1b[31m"}
    session = JudgingSession(tmp_path, ["m-a", "m-b"], ["say \x1b[5msomething"], answers, seed=0)
    shown = io.StringIO()
    assert judge_in_terminal(session, io.StringIO("t\n"), shown) == "done"
    text = shown.getvalue()
    assert "\x1b" not in text and "\r" not in text and "\x07" not in text and "fine" in text and "write" in text
    assert "m-a" not in text and "m-b" not in text


# The browser.

def http(url, body=None, content_type="application/json", headers=None):
    """(status, parsed JSON or text) of a GET, or of a POST when ``body`` is given (bytes are sent as they are)."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    headers = {**({"Content-Type": content_type} if data is not None else {}), **(headers or {})}
    request = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            status, raw = response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        status, raw = error.code, error.read().decode()
    return status, (raw if raw.lstrip().startswith("<") else json.loads(raw))


def test_browser_api(tmp_path):
    names = ["alpha-model", "beta-model", "gamma-model"]
    prompts = ["first prompt", "second prompt"]
    answers = {(name, i): f"<script>alert('{name[0]}{i}')</script> \x1b[31m<b>bold</b>" for name in names for i in range(2)}
    session = JudgingSession(tmp_path, names, prompts, answers, seed=4)
    server = make_judge_server(session, [{"name": name} for name in names], port=0, bootstrap_samples=30, seed=4)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        status, page = http(base + "/")
        assert status == 200 and "Answer 1" in page and "Answer 2" in page and "textContent" in page
        assert "innerHTML" not in page and "http://" not in page and "https://" not in page  # no CDN, no HTML from model text
        assert http(base + "/api/results")[0] == 409
        assert http(base + "/nowhere")[0] == 404
        assert http(base + "/api/next", headers={"Host": "evil.example:80"})[0] == 403

        status, first = http(base + "/api/next")
        assert status == 200 and not first["done"] and first["progress"] == {"judged": 0, "total": 6, "skipped": 0, "remaining": 6}
        assert set(first) == {"done", "progress", "pair_id", "prompt", "answer_1", "answer_2"}
        assert first["prompt"] in prompts and "\x1b" not in first["answer_1"] and "<script>" in first["answer_1"]
        for bad in [{"pair_id": first["pair_id"], "choice": "maybe"}, {"pair_id": first["pair_id"], "choice": True},
                    {"pair_id": first["pair_id"], "choice": 3}, {"pair_id": "999", "choice": 1}, {"pair_id": "x", "choice": 1},
                    {"pair_id": True, "choice": 1},
                    {"choice": 1}, [1, 2], b"{not json"]:
            status, error = http(base + "/api/vote", bad)
            assert status == 400 and error["error"], bad
        assert http(base + "/api/vote", {"pair_id": first["pair_id"], "choice": 1}, content_type="text/plain")[0] == 400
        assert not (tmp_path / "votes.jsonl").exists()

        seen, choices = [], [1, "2", "tie", "skip", "1", 2]
        for choice in choices:
            status, shown = http(base + "/api/next")
            seen.append(json.dumps(shown))
            status, reply = http(base + "/api/vote", {"pair_id": shown["pair_id"], "choice": choice})
            assert status == 200 and reply["ok"]
        status, again = http(base + "/api/vote", {"pair_id": first["pair_id"], "choice": "tie"})
        assert status == 400 and "already judged" in again["error"]
        status, last = http(base + "/api/next")
        assert last["done"] and last["progress"] == {"judged": 5, "total": 6, "skipped": 1, "remaining": 0}
        for response in seen + [page, json.dumps(last)]:
            assert not any(name in response for name in names)

        status, report = http(base + "/api/results")
        assert status == 200 and report["votes"] == 5 and report["ties"] == 1
        assert {row["name"] for row in report["ratings"]} == set(names)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    votes = read_votes(tmp_path / "votes.jsonl")
    schedule = {pair.id: pair for pair in session.schedule}
    assert [v["winner"] for v in votes] == [schedule[0].left, schedule[1].right, "tie", schedule[4].left, schedule[5].right]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_browser_command_on_three_real_models_stops_with_ctrl_c(tmp_path, trained_run, checkpoints, prompts_file, capsys):
    # A third contender: a copy of the latest checkpoint in another run folder (same weights, a different model to judge).
    other_run = tmp_path / "other" / "tiny"
    shutil.copytree(checkpoints[-1], other_run / "checkpoints" / checkpoints[-1].name)
    models = [*checkpoints, other_run]
    contenders = resolve_contenders(models)
    out, port = tmp_path / "judged", free_port()
    args = parse(*models, "--prompts", prompts_file, "--out", out, "--ui", "browser", "--port", port, "--max-new-tokens", 8,
                 "--bootstrap-samples", 50)
    responses, failures, finished = [], [], threading.Event()

    def voter():
        base, reached = f"http://127.0.0.1:{port}", False
        try:
            deadline = time.monotonic() + 120
            while not reached:  # the server starts once the answers are made
                if finished.is_set() or time.monotonic() > deadline:
                    return
                try:
                    responses.append(http(base + "/")[1])
                    reached = True
                except (OSError, http_client.HTTPException):  # not listening yet (or a TCP self-connect to the free port)
                    time.sleep(0.2)
            while not (shown := http(base + "/api/next")[1])["done"]:
                responses.append(json.dumps(shown))
                assert http(base + "/api/vote", {"pair_id": shown["pair_id"], "choice": 1})[0] == 200
            responses.append(http(base + "/api/results")[1])
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            failures.append(exc)
        finally:
            if not finished.is_set():
                _thread.interrupt_main()  # Ctrl-C, as the user stops the server (and never a hang when something failed)

    thread = threading.Thread(target=voter, daemon=True)
    thread.start()
    try:
        code = run_judge(args)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped from the browser UI")
    finally:
        finished.set()
        thread.join(30)
    assert not failures, failures
    assert code == 0
    printed = capsys.readouterr().out
    assert f"open http://127.0.0.1:{port}/ in a browser" in printed and "every pair is judged" in printed
    assert "judge: stopping" in printed and "Bradley-Terry ratings" in printed

    report = json.loads((out / "report.json").read_text())
    assert report["votes"] == 9 and report["pairs_total"] == 9 and len(report["models"]) == 3
    assert {row["name"] for row in report["ratings"]} == {c.name for c in contenders}
    assert len({c.name for c in contenders}) == 3
    results = responses.pop()
    assert {row["name"] for row in results["ratings"]} == {c.name for c in contenders}
    for response in responses:
        assert not any(secret in response for secret in secrets_of(contenders))
    for row in report["pairwise"]:  # every vote went to Answer 1: the placement decides who wins
        assert row["a_wins"] + row["b_wins"] == row["votes"] == 3
