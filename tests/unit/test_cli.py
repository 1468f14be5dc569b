"""The CLI in the exact forms later checks use.

Each spawned Python pays ~8 s (torch, numba's cache) on a loaded 2-core CI machine, so the commands run in-process:
``main(argv)`` is what the console script calls (``sys.exit(main())``), so its return value is the exit code and
what it prints is the output. Real subprocesses stay where the process boundary is what is checked: the console
entry point's exit code and one-line message (test_missing_checkpoint_is_exit_2) and a checkpoint rebuilt in
another process (test_same_seed_same_checkpoint)."""

import json
import subprocess
import sys

import pytest

CLI = [sys.executable, "-m", "router.cli"]


def run(*args, check=True):
    result = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=300,
                            env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    if check:
        assert result.returncode == 0, result.stderr
    return result


def cli(capsys, *args) -> tuple[int, str, str]:
    """``supernet-router ARGS`` in-process: (exit code, stdout, stderr)."""
    from router.cli import main

    capsys.readouterr()
    try:
        code = main([str(a) for a in args])
    except SystemExit as exc:  # argparse's usage errors exit as the console script would
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def ok(capsys, *args) -> str:
    code, out, err = cli(capsys, *args)
    assert code == 0, err
    return out


def test_checkpoint_tiny_and_generate_json(capsys, tmp_path):
    out = tmp_path / "ckpt"
    ok(capsys, "checkpoint", "tiny", "--out", out, "--layers", 4, "--seed", 3)
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    cached = json.loads(ok(capsys, "generate", "--checkpoint", out, "--placement", "ASGK", "--prompt", "def f(x):",
                           "--max-tokens", 20, "--json"))
    assert cached["placement"] == "ASGK" and len(cached["tokens"]) <= 20 and isinstance(cached["text"], str)
    recomputed = json.loads(ok(capsys, "generate", "--checkpoint", out, "--placement", "ASGK", "--prompt", "def f(x):",
                               "--max-tokens", 20, "--json", "--no-cache"))
    assert recomputed == cached


def test_same_seed_same_checkpoint(tiny_checkpoint, tmp_path):
    """The command in another process (its own hash seed, its own RNG state) writes the bytes that the session's
    tiny checkpoint, made here with the same layers and seed (6, 0: the command's defaults), holds."""
    run("checkpoint", "tiny", "--out", tmp_path / "a", "--layers", 6, "--seed", 0)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tiny_checkpoint / "model.safetensors").read_bytes()


def test_requests_file_runs_one_mixed_batch_in_order(capsys, tiny_checkpoint, tmp_path):
    lines = [{"prompt": "import sys", "placement": "AAAAAA", "max_tokens": 5},
             {"prompt": "def main():", "placement": "GKSAGK", "max_tokens": 9},
             {"prompt": "x = [", "placement": "KKKKKK", "max_tokens": 3}]
    requests = tmp_path / "requests.jsonl"
    requests.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    outputs = [json.loads(line) for line in ok(capsys, "generate", "--checkpoint", tiny_checkpoint, "--requests",
                                               requests, "--json").splitlines()]
    assert [o["placement"] for o in outputs] == ["AAAAAA", "GKSAGK", "KKKKKK"]
    for line, output in zip(lines, outputs):
        alone = json.loads(ok(capsys, "generate", "--checkpoint", tiny_checkpoint, "--placement", line["placement"],
                              "--prompt", line["prompt"], "--max-tokens", line["max_tokens"], "--json"))
        assert output == alone


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["--placement", "AASGKX", "--prompt", "x"], 2, "unknown letter(s) X"),
        (["--placement", "AAS", "--prompt", "x"], 2, "has 3 layers but the model has 6"),
        (["--placement", "AAAAAA", "--prompt", "x", "--max-tokens", "0"], 2, "max_tokens must be at least 1"),
        (["--placement", "AAAAAA", "--prompt", "x", "--temperature", "-1"], 2, "temperature must be >= 0"),
    ],
)
def test_bad_generate_input_is_one_line_exit_2(capsys, tiny_checkpoint, args, code, message):
    returncode, _, err = cli(capsys, "generate", "--checkpoint", tiny_checkpoint, *args)
    assert returncode == code
    assert err.count("\n") == 1 and message in err


def test_bad_requests_file_names_the_line(capsys, tiny_checkpoint, tmp_path):
    requests = tmp_path / "bad.jsonl"
    requests.write_text('{"prompt": "ok"}\n{"prompt": \n')
    code, _, err = cli(capsys, "generate", "--checkpoint", tiny_checkpoint, "--requests", requests)
    assert code == 2 and f"{requests}:2: not valid JSON" in err


def test_missing_checkpoint_is_exit_2(tmp_path):
    """The one real console-entry-point run of a refusal: exit code 2 and one line on stderr, nothing else."""
    result = run("generate", "--checkpoint", tmp_path / "none", "--prompt", "x", check=False)
    assert result.returncode == 2 and "no such checkpoint folder" in result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("supernet-router: error: ")


def test_checkpoint_path_is_the_embedded_default(capsys):
    folder = ok(capsys, "checkpoint", "path").strip()
    from pathlib import Path

    assert (Path(folder) / "config.json").exists() and (Path(folder) / "model.safetensors").exists()


def test_train_smoke_and_bad_options(capsys, tmp_path):
    """CI never trains for real: two steps of the tiny shape through the real command, then bad options."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(40):
        (corpus / f"doc{i}.py").write_text(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" * 20)
    common = ["--corpus", corpus, "--steps", 2, "--batch-size", 2, "--seq-len", 16, "--device", "cpu"]
    out = ok(capsys, "train", "teacher", "--out", tmp_path / "t", "--shape", "tiny", "--vocab-size", 300, *common)
    assert out.strip() == str(tmp_path / "t")
    ok(capsys, "train", "supernet", "--teacher", tmp_path / "t", "--out", tmp_path / "s", "--window", 4, *common)
    code, _, err = cli(capsys, "train", "supernet", "--teacher", tmp_path / "nothing", "--out", tmp_path / "x", *common)
    assert code == 2 and "no config.json there (train one with `train teacher`)" in err
    code, _, err = cli(capsys, "train", "teacher", "--out", tmp_path / "y", "--corpus", tmp_path / "missing")
    assert code == 2 and err.count("\n") == 1 and "expected 'stdlib'" in err


def generated(capsys, *args) -> list[int]:
    from router.cli import main

    assert main(["generate", *map(str, args), "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])["tokens"]


@pytest.mark.parametrize("checkpoint, pairs", [
    ("tiny", [("AAAAAA", "GGGGGG"), ("AAAAAA", "SSSSSS"), ("GGGGGG", "KKKKKK"), ("ASGKAS", "GGGGGG")]),
    ("default", [("AAAAAAAA", "GGGGGGGG"), ("AAAAAAAA", "SSSSSSSS"), ("GGGGGGGG", "KKKKKKKK"),
                 ("AGAAGAKA", "GGGGGGGG")]),
])
def test_generate_with_a_draft_prints_the_same_tokens_past_the_window(capsys, tiny_checkpoint, checkpoint, pairs):
    from router.defaults import default_checkpoint

    folder = tiny_checkpoint if checkpoint == "tiny" else default_checkpoint()  # windows of 16 and 32 tokens
    common = ["--checkpoint", folder, "--prompt", "def fibonacci(n):", "--max-tokens", 48, "--temperature", 0]
    for target, draft in pairs:
        plain = generated(capsys, *common, "--placement", target)
        assert generated(capsys, *common, "--placement", target, "--draft", draft, "--draft-tokens", 4) == plain, \
            (target, draft)


def test_generate_refuses_a_bad_draft(capsys, tiny_checkpoint):
    from router.cli import main

    common = ["generate", "--checkpoint", str(tiny_checkpoint), "--prompt", "x", "--draft"]
    assert main([*common, "GGGGGG", "--draft-tokens", "0"]) == 2  # in-process: the same exit code and line
    assert "draft tokens must be an integer from 1 to 8" in capsys.readouterr().err
    assert main([*common, "GGG"]) == 2 and "GGG" in capsys.readouterr().err


def test_acceptance_writes_a_valid_table_and_refuses_bad_options(capsys, tiny_checkpoint, tmp_path):
    from policies.tables import AcceptanceFile, read_table
    from router.cli import main

    data = tmp_path / "text.txt"
    data.write_text("def add(a, b):\n    return a + b\n\n" * 40)
    out = tmp_path / "acceptance.json"
    assert main(["acceptance", "--checkpoint", str(tiny_checkpoint), "--data", str(data), "--targets", "AAAAAA",
                 "--drafts", "GGGGGG,AAAAAA", "--tokens", "3", "--prompts", "2", "--prompt-tokens", "16",
                 "--max-tokens", "12", "--out", str(out)]) == 0
    table = read_table(out, AcceptanceFile)
    by_draft = {e.draft: e for e in table.entries}
    assert set(by_draft) == {"GGGGGG", "AAAAAA"} and table.draft_tokens == 3
    assert by_draft["AAAAAA"].greedy.acceptance_rate == 1.0  # a draft that is the target always agrees
    assert 0 <= by_draft["GGGGGG"].sampled.acceptance_rate <= 1 and by_draft["GGGGGG"].greedy.verify_steps > 0
    capsys.readouterr()
    assert main(["acceptance", "--checkpoint", str(tiny_checkpoint), "--data", str(data), "--targets", "AAAAAA",
                 "--drafts", "GGGGGG", "--tokens", "9", "--out", str(out)]) == 2
    assert "draft tokens must be an integer from 1 to 8" in capsys.readouterr().err


def test_serve_refuses_a_metrics_port_in_use_with_one_line_and_exit_2(capsys, monkeypatch):
    import socket

    def started(*_):  # in-process, a serve the port check let through would start Ray and serve forever: fail
        raise AssertionError("serve went past the port check")

    monkeypatch.setattr("router.defaults.default_config", started)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, _, err = cli(capsys, "serve", "--metrics-port", port)
    assert code == 2, err
    assert err.strip().count("\n") == 0 and f"--metrics-port {port}" in err
