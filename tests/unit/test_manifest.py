from __future__ import annotations

import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from deployer.protocol.errors import ManifestError
from deployer.protocol.manifest import (
    CHECKSUM_ALGORITHMS,
    HOOK_PHASES,
    SRC_SCHEMES,
    Commands,
    HealthCheck,
    Hook,
    Manifest,
    SecretRef,
    SecretSource,
    SyncStrategy,
    parse_manifest,
)

STRETCHER_EXAMPLE = """\
src: s3://example.com/app.tar.gz
checksum: e0840daaa97cd2cf2175f9e5d133ffb3324a2b93
dest: /home/foo/app
dest_mode: 0755
commands:
  pre:
    - echo 'staring deploy'
  post:
    - echo 'deploy done'
  success:
    - echo 'deploy success'
  failure:
    - echo 'deploy failed!!'
    - cat >> /path/to/failure.log
excludes:
  - "*.pid"
  - "*.socket"
exclude_from: exclude.txt
"""


def test_a_stretcher_manifest_parses_with_stretchers_meaning() -> None:
    manifest = parse_manifest(STRETCHER_EXAMPLE)
    assert manifest.src == "s3://example.com/app.tar.gz"
    assert manifest.checksum_algorithm == "sha1"
    assert manifest.dest == "/home/foo/app"
    assert manifest.dest_mode == 0o755
    assert manifest.commands.failure == (Hook("echo 'deploy failed!!'"), Hook("cat >> /path/to/failure.log"))
    assert manifest.excludes == ("*.pid", "*.socket")
    assert manifest.exclude_from == "exclude.txt"
    # No strategy named means stretcher's rsync, never our symlink.
    assert manifest.sync_strategy is SyncStrategy.RSYNC


@pytest.mark.parametrize(
    ("digest", "algorithm"),
    [("a" * 32, "md5"), ("B" * 40, "sha1"), ("c" * 64, "sha256"), ("D" * 128, "sha512")],
)
def test_the_checksum_algorithm_is_picked_by_length_case_insensitively(digest: str, algorithm: str) -> None:
    manifest = parse_manifest(f"src: file:///x.tgz\nchecksum: {digest}\ndest: /x\n")
    assert manifest.checksum_algorithm == algorithm
    assert manifest.checksum == digest.lower()


def test_a_src_less_manifest_only_runs_commands() -> None:
    manifest = parse_manifest("commands:\n  post: [echo hi]\n")
    assert manifest.src is None
    assert manifest.commands.post == (Hook("echo hi"),)


def test_extensions_parse_hook_mappings_env_and_symlink() -> None:
    manifest = parse_manifest(
        """
src: s3://b/k.tar.gz
checksum: %s
dest: /opt/api/current
sync_strategy: symlink
keep_releases: 3
hook_timeout: 30
env: {APP_ENV: prod, WORKERS: 4}
commands:
  post:
    - run: ./bin/migrate
      timeout: 120
      env: {VERBOSE: "1"}
"""
        % ("ab" * 32)
    )
    assert manifest.sync_strategy is SyncStrategy.SYMLINK
    assert manifest.keep_releases == 3
    assert manifest.env == {"APP_ENV": "prod", "WORKERS": "4"}
    assert manifest.commands.post == (Hook("./bin/migrate", 120.0, {"VERBOSE": "1"}),)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("srcc: x\n", "unknown key(s): srcc"),
        ("src: ftp://x/y\nchecksum: " + "a" * 64 + "\ndest: /x\n", "scheme 'ftp'"),
        ("src: s3://b/k\ndest: /x\n", "checksum is required"),
        ("src: s3://b/k\nchecksum: " + "a" * 64 + "\n", "dest is required"),
        ("checksum: abc\n", "checksum 'abc' is not a hex"),
        ("checksum: " + "1" * 32 + "\n", "checksum was read as a number"),
        ("checksum: " + "g" * 64 + "\n", "is not a hex"),
        ("dest: relative/path\n", "must be an absolute path"),
        ("dest_mode: '9999'\n", "dest_mode '9999' is not an octal"),
        ("sync_strategy: copy\n", "sync_strategy 'copy' is not one of rsync, mv, symlink"),
        ("keep_releases: 1\n", "keep_releases must be an integer >= 2"),
        ("commands: [echo]\n", "commands must be a mapping"),
        ("commands: {deploy: [x]}\n", "unknown phase(s): deploy"),
        ("commands: {pre: echo}\n", "commands.pre must be a list"),
        ("commands: {pre: [3]}\n", "commands.pre[0] must be a command string"),
        ("commands: {pre: [{run: x, retries: 2}]}\n", "commands.pre[0] has unknown key(s): retries"),
        ("commands: {pre: [{run: x, timeout: -1}]}\n", "commands.pre[0].timeout must be a positive number"),
        ("env: {'1BAD': x}\n", "invalid variable name '1BAD'"),
        ("excludes: '*.pid'\n", "excludes must be a list of strings"),
        ("- a list\n", "must be a YAML mapping"),
        ("key: [unclosed\n", "not valid YAML"),
        ("health: {retries: 2}\n", "health needs exactly one of command or http"),
        ("health: {command: x, http: 'http://a'}\n", "health needs exactly one of command or http"),
        ("health: {http: 'ftp://a'}\n", "health.http must be an http(s) URL"),
        ("health: {command: x, retries: 0}\n", "health.retries must be an integer 1..100"),
        ("health: {command: x, every: 3}\n", "health has unknown key(s): every"),
        ("run_as: 'root; rm -rf /'\n", "run_as must be a user name"),
        ("dest: /opt/../../etc/cron.d\n", "dest '/opt/../../etc/cron.d' must not contain '..'"),
    ],
)
def test_a_bad_manifest_gets_an_error_naming_the_key(text: str, expected: str) -> None:
    with pytest.raises(ManifestError) as info:
        parse_manifest(text)
    assert expected in str(info.value)


def test_to_yaml_round_trips_through_the_parser() -> None:
    manifest = parse_manifest(STRETCHER_EXAMPLE.replace("dest_mode: 0755", "dest_mode: 0750") + "sync_strategy: mv\n")
    again = parse_manifest(manifest.to_yaml())
    assert again == manifest


def test_the_default_manifest_object_means_stretchers_rsync() -> None:
    assert Manifest().sync_strategy is SyncStrategy.RSYNC


def test_health_and_run_as_parse_and_round_trip() -> None:
    manifest = parse_manifest(
        "health: {http: 'http://127.0.0.1:8080/health', retries: 5, interval: 1}\nrun_as: www-data\n"
    )
    assert manifest.health == HealthCheck(http="http://127.0.0.1:8080/health", retries=5, interval=1.0)
    assert manifest.run_as == "www-data"
    assert parse_manifest(manifest.to_yaml()) == manifest


# -- the round trip, for every manifest the model can hold -------------------------------------

words = st.text(
    alphabet=string.ascii_letters + string.digits + " ._-/$'\"=:#{}[]&|;!*", min_size=1, max_size=40
).filter(lambda s: s.strip() != "")
paths = st.lists(st.from_regex(r"[A-Za-z0-9._-]{1,12}", fullmatch=True), min_size=1, max_size=4).map(
    lambda parts: "/" + "/".join(parts)
)
seconds = st.floats(min_value=0.001, max_value=1e6, allow_nan=False, allow_infinity=False)
env_maps = st.dictionaries(st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,15}", fullmatch=True), words, max_size=3)
hooks = st.builds(Hook, run=words, timeout=st.none() | seconds, env=env_maps)
checksums = st.sampled_from(sorted(CHECKSUM_ALGORITHMS)).flatmap(
    lambda n: st.text(alphabet="0123456789abcdef", min_size=n, max_size=n)
)
health_checks = st.builds(
    HealthCheck,
    command=words,
    retries=st.integers(min_value=1, max_value=100),
    interval=seconds,
    timeout=seconds,
) | st.builds(
    HealthCheck,
    http=paths.map(lambda p: f"http://127.0.0.1:8080{p}"),
    retries=st.integers(min_value=1, max_value=100),
    interval=seconds,
    timeout=seconds,
)


@st.composite
def manifests(draw: st.DrawFn) -> Manifest:
    src = draw(st.none() | st.sampled_from(SRC_SCHEMES).flatmap(lambda s: paths.map(lambda p: f"{s}://bucket{p}")))
    return Manifest(
        src=src,
        checksum=draw(checksums) if src else draw(st.none() | checksums),
        dest=draw(paths) if src else draw(st.none() | paths),
        dest_mode=draw(st.none() | st.integers(min_value=0, max_value=0o7777)),
        commands=Commands(*(tuple(draw(st.lists(hooks, max_size=2))) for _ in HOOK_PHASES)),
        excludes=tuple(draw(st.lists(words, max_size=3))),
        exclude_from=draw(st.none() | paths),
        sync_strategy=draw(st.sampled_from(list(SyncStrategy))),
        keep_releases=draw(st.integers(min_value=2, max_value=50)),
        env=draw(env_maps),
        hook_timeout=draw(st.none() | seconds),
        health=draw(st.none() | health_checks),
        run_as=draw(st.none() | st.from_regex(r"[a-z_][a-z0-9_-]{0,31}", fullmatch=True)),
    )


@given(manifests())
def test_every_manifest_reads_back_equal_to_what_was_written(manifest: Manifest) -> None:
    assert parse_manifest(manifest.to_yaml()) == manifest


def test_env_may_name_secrets_which_are_checked_and_written_back_as_named() -> None:
    manifest = parse_manifest(
        "src: s3://b/a.tgz\nchecksum: '" + "a" * 64 + "'\ndest: /opt/api/current\nsync_strategy: symlink\n"
        "env:\n  PLAIN: x\n  DB_PASSWORD: {ssm: /prod/web/db_password}\n"
        "  API_TOKEN: {secretsmanager: prod/web/api, key: token, file: secrets/token}\n"
    )
    assert manifest.env == {"PLAIN": "x"}
    assert manifest.secrets == {
        "DB_PASSWORD": SecretRef(SecretSource.SSM, "/prod/web/db_password"),
        "API_TOKEN": SecretRef(SecretSource.SECRETS_MANAGER, "prod/web/api", key="token", file="secrets/token"),
    }
    assert parse_manifest(manifest.to_yaml()) == manifest


@pytest.mark.parametrize(
    ("env", "error"),
    [
        ("{X: {ssm: /a, secretsmanager: b}}", r"env.X must be \{ssm: NAME\}"),
        ("{X: {vault: /a}}", r"env.X must be \{ssm: NAME\}"),
        ("{X: {ssm: 'a b'}}", "env.X.ssm 'a b' is not a valid ssm name"),
        ("{X: {ssm: /a, key: k}}", "env.X.key must be a field name of a secretsmanager JSON secret"),
        ("{X: {ssm: /a, file: ../out}}", "must be a relative path inside the release"),
        ("{X: {ssm: /a, file: /etc/x}}", "must be a relative path inside the release"),
    ],
)
def test_a_secret_that_is_not_well_named_is_refused_naming_the_variable(env: str, error: str) -> None:
    with pytest.raises(ManifestError, match=error):
        parse_manifest(f"sync_strategy: symlink\ndest: /opt/x\nenv: {env}\n")


def test_a_secret_file_needs_the_symlink_strategy() -> None:
    with pytest.raises(ManifestError, match=r"env\.X\.file needs sync_strategy symlink"):
        parse_manifest("env: {X: {ssm: /a, file: secret}}\n")
