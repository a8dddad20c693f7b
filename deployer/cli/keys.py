"""Commands for the keys that sign deploys: `deployer keygen` and `deployer trust new|show|sign-update|refresh`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from deployer.cli.options import Store, name_callback, quiet, sign_key_option, store_options
from deployer.protocol.errors import ConfigError

if TYPE_CHECKING:
    from deployer.protocol.freshness import Freshness


@click.command()
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Where to write the private key (PEM).")
def keygen(out: Path) -> None:
    """Write a new Ed25519 signing key (mode 0600, never overwriting) and print its key id and public key.

    Use it as `--sign-key file:<path>`; put its public key in a trust document (`deployer trust new`).
    """
    import base64

    from publisher.signing import keygen as make_key

    key = make_key(out)
    click.echo(f"wrote {out}")
    click.echo(f"key id:     {key.keyid}")
    click.echo(f"scheme:     {key.scheme}")
    click.echo(f"public key: {base64.b64encode(key.der).decode()}")


@click.group()
def trust() -> None:
    """Trust documents: which keys instances believe (baked into the image, updated by signed versions)."""


@trust.command("new")
@click.option(
    "--deploy-key",
    "deploy_keys",
    multiple=True,
    required=True,
    help="A key that signs deploys (kms:… or file:…); repeatable.",
)
@click.option(
    "--trust-key",
    "trust_keys",
    multiple=True,
    help="A key that signs trust updates [default: the deploy keys]; repeatable.",
)
@click.option(
    "--threshold", default=1, show_default=True, type=click.IntRange(min=1), help="Signatures a deploy needs."
)
@click.option(
    "--trust-threshold",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    help="Signatures a trust update needs.",
)
@click.option(
    "--version", "version", default=1, show_default=True, type=click.IntRange(min=1), help="This document's version."
)
@click.option(
    "--floor", "floors", multiple=True, metavar="STAGE/ROLE/COMPONENT=SEQ", help="A channel's minimum seq; repeatable."
)
@click.option(
    "--freshness",
    metavar="EXPIRES_S/REFRESH_S",
    help="Make every channel's signed timestamp matter: agents report a channel stale once its newest "
    "timestamp is older than EXPIRES_S, and `deployer trust refresh` runs every REFRESH_S, e.g. 86400/21600.",
)
@click.option("--region", envvar=["AWS_REGION", "AWS_DEFAULT_REGION"], help="AWS region (for kms: keys).")
@click.option("--endpoint-url", envvar="AWS_ENDPOINT_URL", help="AWS endpoint (for kms: keys).")
def trust_new(
    deploy_keys: tuple[str, ...],
    trust_keys: tuple[str, ...],
    threshold: int,
    trust_threshold: int,
    version: int,
    floors: tuple[str, ...],
    freshness: str | None,
    region: str | None,
    endpoint_url: str | None,
) -> None:
    """Print a trust document naming these keys' public halves (bake version 1 into the image)."""
    from deployer.protocol.names import Channel
    from deployer.protocol.trust import DEPLOY_ROLE, TRUST_ROLE, Role, Trust, parse_trust
    from publisher.signing import public_key, signer_from_spec

    deployers = [public_key(signer_from_spec(spec, region, endpoint_url)) for spec in deploy_keys]
    trusters = [public_key(signer_from_spec(spec, region, endpoint_url)) for spec in trust_keys] or deployers
    seqs = {}
    for floor in floors:
        name, _, seq = floor.partition("=")
        try:
            seqs[Channel.parse(name)] = int(seq)
        except ValueError as exc:
            raise ConfigError(f"--floor {floor!r} must be stage/role/component=seq: {exc}") from None
    document = Trust(
        version=version,
        keys={k.keyid: k for k in [*deployers, *trusters]},
        roles={
            DEPLOY_ROLE: Role(frozenset(k.keyid for k in deployers), threshold),
            TRUST_ROLE: Role(frozenset(k.keyid for k in trusters), trust_threshold),
        },
        floors=seqs,
        freshness=_freshness(freshness) if freshness else None,
    )
    click.echo(parse_trust(document.to_json()).to_json())  # what an agent will parse, checked now


@trust.command("check")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def trust_check(path: Path) -> None:
    """Parse a trust document as an agent will (exit 1 naming what is wrong): run before baking it."""
    from deployer.agent.trust_store import load_trust_file

    document = load_trust_file(path)
    roles = ", ".join(f"{name} {role.threshold} of {len(role.keyids)}" for name, role in sorted(document.roles.items()))
    click.echo(
        f"{path}: trust version {document.version}, {len(document.keys)} key(s), {roles}, {len(document.floors)} floor(s)"
    )


@trust.command("show")
@click.option("--config", "config_path", required=True, type=click.Path(path_type=Path), help="Agent config YAML.")
@click.option("--json", "as_json", is_flag=True, help="The trust document itself.")
def trust_show(config_path: Path, as_json: bool) -> None:
    """What this instance trusts now: the baked trust file, or a newer signed version it accepted."""
    from deployer.agent.config import load_config
    from deployer.agent.trust_store import TRUST_CACHE_NAME, TrustStore, load_trust_file

    config = load_config(config_path)
    if config.trust_file is None:
        click.echo("no trust_file configured: signed deploys are opened unverified, unsigned ones accepted")
        return
    baked = load_trust_file(config.trust_file)
    store = TrustStore(
        baked, required=config.require_signatures, cache=config.state_dir / TRUST_CACHE_NAME, fetch=lambda _v: None
    )
    current = store.current
    assert current is not None
    if as_json:
        click.echo(current.to_json())
        return
    source = (
        str(config.trust_file)
        if current is baked
        else f"{config.state_dir / TRUST_CACHE_NAME} (updated from the bucket)"
    )
    click.echo(
        f"trust version {current.version} from {source}; signatures {'required' if config.require_signatures else 'verified when present'}"
    )
    for name, role in sorted(current.roles.items()):
        click.echo(f"  {name}: {role.threshold} of {len(role.keyids)} key(s)")
        for keyid in sorted(role.keyids):
            click.echo(f"    {keyid}  {current.keys[keyid].scheme}")
    for channel, seq in sorted(current.floors.items(), key=lambda item: str(item[0])):
        click.echo(f"  floor {channel}: seq {seq}")
    if current.freshness is not None:
        click.echo(
            f"  freshness: a timestamp vouches for {current.freshness.expires_s}s, refreshed every "
            f"{current.freshness.refresh_s}s"
        )


@trust.command("sign-update")
@store_options
@click.option(
    "--trust-doc",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The new trust document (JSON).",
)
@sign_key_option("Sign with this key of the CURRENT trust's trust role.")
@quiet
def trust_sign_update(store: Store, trust_doc: Path, sign_keys: tuple[str, ...]) -> None:
    """Sign a trust version and store it in the bucket as `trust/<version>.json`.

    A version's document never changes once stored; signing it again adds signatures (for a
    threshold above one, each key holder runs this with their own key). Instances take it at
    their next reconcile if, and only if, enough of the trust keys of the version they hold
    signed it and it is exactly the next version.
    """
    from publisher.trust_update import store_trust_version

    stored = store_trust_version(
        store.clients, store.bucket, store.layout, trust_doc.read_bytes(), store.signers(sign_keys)
    )
    click.echo(
        f"stored trust version {stored.version} as s3://{store.bucket}/{stored.key}, "
        f"now signed by {len(stored.envelope.signatures)} key(s)"
    )


@trust.command("refresh")
@store_options
@click.option("--stage", callback=name_callback("stage"), help="Only this stage's channels.")
@click.option("--role", callback=name_callback("role"), help="Only this role's channels (with --stage).")
@click.option("--component", callback=name_callback("component"), help="Only this component's channels.")
@sign_key_option("Sign the timestamps with this deploy key.")
@quiet
def trust_refresh(
    store: Store, stage: str | None, role: str | None, component: str | None, sign_keys: tuple[str, ...]
) -> None:
    """Vouch again for every channel's current pointer: a signed timestamp saying it is current now.

    Run it on a schedule more often than the trust's freshness.refresh_s (with the CI role: it
    reads pointers and writes `channels/…/timestamp.json`). While it runs, no agent reports its
    channel stale; when it stops (or its writes are withheld), every agent does within expires_s.
    """
    from publisher.freshness import channels_with_pointers, refresh

    channels = [
        channel
        for channel in channels_with_pointers(store.clients.s3, store.bucket, store.layout)
        if (stage or channel.stage, role or channel.role, component or channel.component)
        == (channel.stage, channel.role, channel.component)
    ]
    stamps = refresh(store.clients.s3, store.bucket, store.layout, store.signers(sign_keys), channels)
    for stamp in stamps:
        click.echo(f"{stamp.channel}: seq {stamp.seq} vouched for at {stamp.signed_at:%Y-%m-%dT%H:%M:%SZ}")
    click.echo(f"{len(stamps)} channel(s) refreshed")


def _freshness(spec: str) -> Freshness:
    from deployer.protocol.freshness import freshness_from_dict

    expires, _, refresh = spec.partition("/")
    try:
        return freshness_from_dict({"expires_s": int(expires), "refresh_s": int(refresh)})
    except ValueError as exc:
        raise ConfigError(f"--freshness {spec!r}: {exc} (EXPIRES_S/REFRESH_S, e.g. 86400/21600)") from None


COMMANDS = (keygen, trust)
