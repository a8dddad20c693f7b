"""The fleet page, the pure part: escaping of untrusted report values, a colour per cell, waves,
stale instances, errors, the empty fleet, and a 10,000-instance fleet in one pass."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser

from deployer.protocol.names import Channel
from deployer.protocol.report import ComponentState, ComponentStatus
from deployer.protocol.rollout import BUCKETS, STABLE_SUFFIX, Cursor, Plan, RolloutState, Stable
from publisher.fleet import Row, fleet_rows, summary
from publisher.page import ERROR_PREVIEW_CHARS, LEGEND, Kind, kind_of, render_page
from tests.support import make_deploy, report_entry

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
RECENT = NOW - timedelta(seconds=30)
HOURS_AGO = NOW - timedelta(hours=3)
API = Channel("prod", "web", "api")
SCRIPT = "<script>document.title='pwned'</script>"
BREAKOUT = '"><img src=x onerror="document.body.dataset.pwned=\'1\'">'
STABLE = Stable("rel-stable", "deployer/releases/api/rel-stable/manifest.yml", "c" * 64)


@dataclass
class Parsed(HTMLParser):
    """The page as a browser's parser sees it: every element with its attributes, and the text."""

    elements: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    text: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__init__(convert_charrefs=True)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, {name: value or "" for name, value in attrs}))

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    def tags(self) -> set[str]:
        return {tag for tag, _ in self.elements}

    def cells(self) -> dict[str, str]:
        """The grid's coloured cells: their title (component: release seq, state) → their class."""
        return {
            a["title"]: a["class"] for tag, a in self.elements if tag == "td" and a.get("class", "").startswith("k-")
        }

    def all_text(self) -> str:
        return "".join(self.text)


def parse(page: str) -> Parsed:
    parsed = Parsed()
    parsed.feed(page)
    parsed.close()
    return parsed


def api(seq: int, state: ComponentState = ComponentState.OK, **changes: str) -> dict[str, ComponentStatus]:
    return {"api": ComponentStatus(**{"state": state, "release_id": f"r{seq}", "seq": seq, **changes})}  # type: ignore[arg-type]


def render(rows: list[Row], **kwargs: object) -> str:
    return render_page(rows, generated_at=NOW, source="s3://my-deploys/deployer", **kwargs)  # type: ignore[arg-type]


def test_an_injected_script_and_an_attribute_breakout_in_a_report_are_shown_as_text_not_markup() -> None:
    hostile = api(3, ComponentState.FAILED, error=f"{SCRIPT} {BREAKOUT}", release_id=f"r3{BREAKOUT}")
    rows = fleet_rows(
        [report_entry("i-1", hostile, RECENT), report_entry("i-bad", {}, RECENT, error=f"not JSON: {SCRIPT}")], now=NOW
    )
    page = render(rows)
    parsed = parse(page)
    assert "script" not in parsed.tags()
    assert "img" not in parsed.tags()
    assert not any(name.startswith("on") for _, attrs in parsed.elements for name in attrs)
    assert f"{SCRIPT} {BREAKOUT}" in parsed.all_text()  # shown, whole, as text
    assert f"not JSON: {SCRIPT}" in parsed.all_text()
    assert any(attrs.get("title") == f"{SCRIPT} {BREAKOUT}" for _, attrs in parsed.elements)  # and in a title, intact
    assert "&lt;script&gt;" in page
    assert "&quot;&gt;&lt;img" in page
    assert f"r3{BREAKOUT}" in parsed.all_text()  # the release id too: every report value is untrusted


def test_the_page_fetches_nothing_runs_nothing_and_says_so_in_its_content_security_policy() -> None:
    page = render(fleet_rows([report_entry("i-1", api(1), RECENT)], now=NOW))
    parsed = parse(page)
    assert parsed.tags().isdisjoint({"script", "link", "img", "iframe", "object", "embed", "form", "base", "a"})
    assert not any({"src", "href"} & set(attrs) for _, attrs in parsed.elements)
    assert "http:" not in page
    assert "https:" not in page
    assert "url(" not in page
    csp = next(a["content"] for tag, a in parsed.elements if tag == "meta" and a.get("http-equiv"))
    assert csp.startswith("default-src 'none'")
    assert "script-src" not in csp


def test_each_cell_is_coloured_by_its_state_and_the_legend_counts_every_kind() -> None:
    rows = fleet_rows(
        [
            report_entry("i-ok", api(5), RECENT),
            report_entry("i-failed", api(5, ComponentState.FAILED, error="hook post exited 3"), RECENT),
            report_entry("i-rejected", api(5, ComponentState.REJECTED, error="checksum"), RECENT),
            report_entry("i-applying", api(5, ComponentState.APPLYING), RECENT),
            report_entry("i-pending", {"api": ComponentStatus()}, RECENT),  # nothing applied: behind too
            report_entry("i-behind", api(4), RECENT),
            report_entry("i-stale", api(5, ComponentState.FAILED), HOURS_AGO),
        ],
        now=NOW,
        pointers={API: make_deploy(seq=5)},
    )
    cells = parse(render(rows)).cells()
    assert cells == {
        "api: r5 seq 5, ok": "k-ok",
        "api: r5 seq 5, failed": "k-failed",
        "api: r5 seq 5, rejected": "k-rejected",
        "api: r5 seq 5, applying": "k-applying",
        "api: - no seq, pending, behind 5": "k-behind",
        "api: r4 seq 4, ok, behind 5": "k-behind",
        "api: r5 seq 5, failed, stale": "k-stale",
    }
    page = render(rows)
    for kind in LEGEND:
        assert f".k-{kind.value}{{background:" in page  # every kind has its colour, spelled once
    assert '<b>failed</b> <span class="n">1</span> may succeed on retry' in page


def test_stale_beats_failed_and_an_aborted_rollout_colours_its_admitted_waves_rolled_back() -> None:
    plan = Plan(("1", "100%"), ("i-first",), (BUCKETS,), STABLE)
    deploy = make_deploy(seq=9, rollout=plan)
    entries = [
        report_entry("i-first", api(9, deploy_id=deploy.deploy_id + STABLE_SUFFIX), RECENT),
        report_entry("i-other", api(9, ComponentState.WAITING), RECENT),
        report_entry("i-gone", api(9, ComponentState.FAILED), HOURS_AGO),
    ]
    rows = {r.instance_id: r for r in fleet_rows(entries, now=NOW, pointers={API: deploy})}
    aborted = Cursor(deploy.deploy_id, 0, RolloutState.ABORTED, NOW, "ci:1", NOW, "2 failed, 0 tolerated")
    assert kind_of(rows["i-first"], aborted) is Kind.ROLLED_BACK
    assert kind_of(rows["i-first"]) is Kind.OK
    assert kind_of(rows["i-other"], aborted) is Kind.WAITING  # wave 1 was never admitted
    assert kind_of(rows["i-gone"], aborted) is Kind.STALE
    assert kind_of(fleet_rows([report_entry("i-new", {"api": ComponentStatus()}, RECENT)], now=NOW)[0]) is Kind.PENDING
    page = render(list(rows.values()), pointers={API: deploy}, cursors={API: aborted})
    assert "rolled back at wave 0/1: 2 failed, 0 tolerated" in parse(page).all_text()


def test_a_boot_failure_and_an_unreadable_report_have_their_own_colours_and_errors() -> None:
    entry = report_entry("i-boot", api(2), RECENT)
    assert entry.report is not None
    broken = replace(entry, report=replace(entry.report, boot_error="AccessDenied on sqs:CreateQueue"))
    rows = fleet_rows([broken, report_entry("i-bad", {}, RECENT, error="report is not JSON")], now=NOW)
    parsed = parse(render(rows))
    assert parsed.cells() == {"api: r2 seq 2, boot_failed": "k-boot_failed", "report is not JSON": "k-unreadable"}
    text = parsed.all_text()
    assert "AccessDenied on sqs:CreateQueue" in text
    assert "report is not JSON" in text
    assert summary([r for r in rows if r.state == "unreadable"])[0] in text


def test_a_staged_rollout_shows_each_wave_its_size_whether_it_is_admitted_and_each_instance_its_wave() -> None:
    live = [f"i-{n:02d}" for n in range(12)]
    plan = Plan(("1", "50%", "100%"), ("i-00",), (5000, BUCKETS), STABLE)
    deploy = make_deploy(seq=43, rollout=plan)
    candidate = api(43, deploy_id=deploy.deploy_id)
    stable = api(43, ComponentState.WAITING, deploy_id=deploy.deploy_id + STABLE_SUFFIX)
    entries = [
        report_entry(instance, candidate if plan.wave_of(deploy.deploy_id, instance) <= 1 else stable, RECENT)
        for instance in live
    ]
    rows = fleet_rows(entries, now=NOW, pointers={API: deploy})
    cursor = Cursor(deploy.deploy_id, 1, RolloutState.ROLLING, NOW, "ci:7", NOW + timedelta(seconds=60))
    parsed = parse(render(rows, pointers={API: deploy}, cursors={API: cursor}))
    text = parsed.all_text()
    sizes = [sum(1 for r in rows if r.wave == wave) for wave in range(3)]
    assert "rolling at wave 1/2 (driver ci:7)" in text
    assert f"wave 01admitted{sizes[0]}{sizes[0]}00" in text
    assert f"wave 150%admitted{sizes[1]}{sizes[1]}00" in text
    assert f"wave 2100%not yet{sizes[2]}00{sizes[2]}" in text
    assert text.count("wave 2") == 1 + sizes[2]  # the wave table, and each of its instances' cells
    assert ("tr", {"class": "current"}) in parsed.elements
    assert "pointer: seq 43, release 20261126T0150Z-3f2a9c1 (published 2026-11-26T01:50:00Z)" in text
    assert summary(rows)[0] in text


def test_without_a_readable_cursor_the_page_says_admission_is_unknown() -> None:
    plan = Plan(("1", "100%"), ("i-1",), (BUCKETS,), STABLE)
    deploy = make_deploy(seq=2, rollout=plan)
    rows = fleet_rows([report_entry("i-1", api(2), RECENT)], now=NOW, pointers={API: deploy})
    text = parse(render(rows, pointers={API: deploy})).all_text()
    assert "no readable cursor: which waves are admitted is unknown" in text
    assert "wave 01unknown1" in text


def test_a_stale_instance_is_tagged_and_a_long_error_is_cut_in_the_grid_but_whole_in_its_details() -> None:
    long_error = "hook post `./bin/migrate` exited 3: " + 'relation "users" does not exist; ' * 10
    rows = fleet_rows(
        [
            report_entry("i-stale", api(1), HOURS_AGO),
            report_entry("i-long", api(1, ComponentState.FAILED, error=long_error), RECENT),
        ],
        now=NOW,
    )
    page = render(rows)
    parsed = parse(page)
    assert '<tr class="stale"><th scope="row">i-stale <span class="tag">stale</span></th>' in page
    assert "1 stale" in parsed.all_text()
    details = next(a for tag, a in parsed.elements if tag == "details" and "title" in a)
    assert details["title"] == long_error
    assert long_error[: ERROR_PREVIEW_CHARS - 1] + "…" in parsed.all_text()
    assert long_error in parsed.all_text()  # the <pre> inside <details>


def test_an_empty_fleet_is_a_page_that_says_nobody_has_reported() -> None:
    parsed = parse(render([]))
    assert "no instances have reported yet" in parsed.all_text()
    assert "0 instance(s)" in parsed.all_text()
    assert "generated 2026-11-26T12:00:00Z" in parsed.all_text()


def test_ten_thousand_instances_render_in_one_pass_at_a_bounded_size_per_cell() -> None:
    two = {**api(7), "assets": ComponentStatus(state=ComponentState.OK, release_id="a1", seq=3)}
    entries = [
        report_entry(f"i-{n:05d}", two, RECENT, role=("web", "worker")[n % 2], error=None) for n in range(10_000)
    ]
    rows = fleet_rows(entries, now=NOW)
    started = time.perf_counter()
    page = render(rows)
    elapsed = time.perf_counter() - started
    assert page.count('<td class="k-ok"') == 20_000
    assert len(page) < 20_000 * 400  # ~300 bytes per cell: 10,000 instances stay a few MB
    assert elapsed < 10, f"{elapsed:.1f}s for 10,000 instances: something is no longer linear"
