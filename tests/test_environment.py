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
