"""grouppo.environment: what every result file records about the machine that produced it."""

import json

from grouppo.environment import KERNEL_FLAGS, describe_environment, grouppo_version, hardware_line


def test_the_record_names_the_cpu_its_kernel_flags_the_libraries_and_the_commit(monkeypatch):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    env = describe_environment()
    json.dumps(env)  # written as JSON beside results
    assert env["cpu"]["cores"] >= 1 and set(env["cpu"]["kernel_flags"]) <= set(KERNEL_FLAGS)
    assert env["libraries"]["torch"] and env["libraries"]["grouppo"] == grouppo_version()
    assert env["environment"]["ONEDNN_MAX_CPU_ISA"] == "AVX2"
    assert env["torch_threads"] >= 1 and env["grouppo_commit"]
    line = hardware_line(env)
    assert env["cpu"]["model"] in line and f"torch {env['libraries']['torch']}" in line


def test_log_progress_writes_plain_lines_and_the_end_once(capsys):
    """In a redirected log: one line per interval, the end shown once, no carriage returns or escapes."""
    from grouppo.environment import LogProgress

    with LogProgress(total=3, desc="generating", unit="seq", interval=0.0) as bar:
        for _ in range(3):
            bar.update()
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" (")[0] for line in lines] == [f"generating: {n}/3 seq" for n in (1, 2, 3)]
    with LogProgress(total=3, desc="scoring", unit="groups", interval=3600.0) as bar:
        bar.update(3)
    err = capsys.readouterr().err
    assert err.startswith("scoring: 3/3 groups (") and err.count("\n") == 1
    with LogProgress(total=2, desc="sampling", unit="prompts", interval=0.0) as bar:
        bar.update(2)
        bar.set_postfix(groups=1)  # a count that changed after the last line: the end shows it
    assert capsys.readouterr().err.splitlines()[-1].endswith("groups=1)")
    assert "\r" not in err and "\x1b" not in err
