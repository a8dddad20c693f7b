"""A flaky network is never a verdict: answers cut with a reset or a clean close, at every point,
on every call of boot and apply, end converged — no agent exits, no valid release is rejected."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from deployer.protocol.deploy import Deploy
from deployer.protocol.report import ComponentState
from tests.faultproxy import Fault, FaultProxy, Rule, aws_operation
from tests.support import AgentProcess, Fleet, wait_until

#: What boot does, in order, and how each call shows in a request head.
BOOT_CALLS = (
    "GetCallerIdentity",
    "AmazonSQS.CreateQueue",
    "AmazonSQS.GetQueueAttributes",
    "AmazonSQS.SetQueueAttributes",
    "Subscribe",
    "PUT /deployer-test/deployer/status/",
    "GET /deployer-test/deployer/channels/",
)


def cut_first(call: str, fault: Fault, times: int = 1) -> Rule:
    """Cut the first `times` requests whose operation (or request line) contains `call`."""
    left = [times]

    def rule(head: bytes) -> Fault:
        if call in aws_operation(head) and left[0] > 0:
            left[0] -= 1
            return fault
        return Fault.PASS

    return rule


@pytest.fixture
def proxy(fleet: Fleet) -> Iterator[FaultProxy]:
    with FaultProxy.to(fleet.endpoint_url) as running:
        yield running


@pytest.mark.parametrize("fault", [Fault.FIN_MID_BODY, Fault.FIN_MID_HEADERS])
@pytest.mark.parametrize("call", BOOT_CALLS)
def test_every_boot_call_cut_short_is_retried_and_boot_converges(
    call: str, fault: Fault, proxy: FaultProxy, fleet: Fleet, tmp_path: Path, publish: Callable[..., Deploy]
) -> None:
    deploy = publish("before boot")
    proxy.rule = cut_first(call, fault)
    agent = AgentProcess(fleet, tmp_path / "booting", "i-0b0075ed0000cafe", endpoint_url=proxy.url)
    result = agent.run_once("boot")
    assert result.returncode == 0, result.stderr[-3000:]
    assert proxy.counts[fault] == 1, f"{call} was never cut: {proxy.counts}"
    assert agent.on_seq(deploy.seq)
    assert agent.hook_runs() == [deploy.deploy_id]


@pytest.mark.parametrize(
    "fault", [Fault.FIN_BEFORE_HEADERS, Fault.FIN_MID_HEADERS, Fault.FIN_MID_BODY, Fault.RST_MID_BODY]
)
@pytest.mark.parametrize("what", ["manifest.yml", "/artifacts/", "/history/"])
def test_a_release_download_cut_short_is_retried_not_rejected(
    what: str,
    fault: Fault,
    proxy: FaultProxy,
    start_agent: Callable[..., AgentProcess],
    publish: Callable[..., Deploy],
) -> None:
    agent = start_agent(endpoint_url=proxy.url)
    proxy.rule = cut_first(what, fault)
    deploy = publish("worth every byte")
    wait_until(lambda: agent.on_seq(deploy.seq), "the release to land despite the cut")
    assert proxy.counts[fault] == 1
    assert agent.served() == "worth every byte"
    assert not agent.events("deploy_unauthentic")
    assert [e for e in agent.events("apply_failed") if e.get("outcome") == "rejected"] == []
    assert agent.component().state is ComponentState.OK


def test_a_chunked_artifact_cut_inside_a_chunk_is_retried(
    proxy: FaultProxy, start_agent: Callable[..., AgentProcess], publish: Callable[..., Deploy], tmp_path: Path
) -> None:
    agent = start_agent(endpoint_url=proxy.url)
    proxy.rule = cut_first("/artifacts/", Fault.FIN_MID_CHUNK, times=2)
    deploy = publish("chunk by chunk")
    wait_until(lambda: agent.on_seq(deploy.seq), "the release to land despite two cut chunks")
    assert proxy.counts[Fault.FIN_MID_CHUNK] == 2
    assert agent.served() == "chunk by chunk"
    assert not (tmp_path / "never").exists()
