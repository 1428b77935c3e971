"""The ``ctid`` command line.

* ``ctid run -c ctid.toml [--loop auto|asyncio|uvloop]``: the daemon, in the foreground,
  logging to stdout; SIGTERM or SIGINT stop it cleanly (see ``ctid.app``). ``--loop``
  picks the event loop: ``auto`` (the default) runs uvloop when it can be imported, else
  asyncio's own loop; ``uvloop`` without uvloop installed is a usage error (exit 2). The
  log line ``ctid.event_loop`` (before ``ctid.starting``) names the loop that runs.
* ``ctid check-config -c ctid.toml``: validate and print every problem (file, key,
  reason); exit 0 when valid, 2 when not.
* ``ctid demo``: the daemon on embedded defaults (SQLite, no MQTT) with the built-in
  Asterisk simulator acting as the PBX and generating inbound calls; ``--loop`` as for
  ``run``.
* ``ctid db upgrade -c ctid.toml``: apply database migrations and exit.
* ``ctid seed -c ctid.toml [--force]``: migrate, then add the config's agents, queues and
  skills that the database lacks and print what was done. Entries already in the
  database (an admin may have changed them over the API) are kept; ``--force``
  overwrites them from the config. Nothing is ever deleted. Exit 1 if the database
  fails.
* ``ctid hash-secret``: hash an agent's PIN or password (read from stdin, never from
  the command line) for ``pin_hash`` in the config.
* ``ctid prompts check -c ctid.toml --sounds DIR [--language LANG ...]``: list the flows'
  prompts that Asterisk would not find in DIR for a language (the config's languages
  plus ``--language``, default ``en``; lookup rules in ``ctid.ivr.prompts``); exit 0
  when none is missing, 1 when some are. ``ctid prompts tts ... [--texts FILE]``
  generates the missing ones with espeak-ng and sox; exit 1 if some are left.
* ``ctid version``.

Exit codes: 0 success, 1 runtime failure (e.g. AMI login rejected), 2 bad usage or config.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from ctid import __version__
from ctid.config import Config, ConfigError, load, parse

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2

#: ``--loop`` of ``run`` and ``demo``.
LOOPS = ("auto", "asyncio", "uvloop")

LoopFactory = Callable[[], asyncio.AbstractEventLoop]


class LoopUnavailable(Exception):
    """``--loop uvloop`` where uvloop cannot be imported."""


def loop_factory(choice: str) -> LoopFactory | None:
    """The event loop factory for a ``--loop`` choice; None is asyncio's own loop.

    ``auto`` is uvloop when it can be imported, else asyncio; ``uvloop`` raises
    :class:`LoopUnavailable` when it cannot. The bench (``bench/ws_fanout.py``) resolves
    its server loop with this, so it measures ctid on the loop ``ctid run`` picks."""
    if choice not in LOOPS:
        raise ValueError(f"unknown event loop {choice!r} (one of {', '.join(LOOPS)})")
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError as exc:
        if choice == "uvloop":
            raise LoopUnavailable(f"--loop uvloop: uvloop cannot be imported ({exc})") from None
        return None
    return uvloop.new_event_loop


def loop_name(loop: asyncio.AbstractEventLoop) -> str:
    """``uvloop`` or ``asyncio``: the package of the loop's class."""
    return type(loop).__module__.split(".")[0]


def _run_on_loop(choice: str, factory: LoopFactory | None, main: Coroutine[Any, Any, int]) -> int:
    """``asyncio.run(main)`` on the chosen loop (``asyncio.Runner``: its
    ``loop_factory`` exists from Python 3.11, ``asyncio.run``'s only from 3.12)."""

    async def logged() -> int:
        import structlog

        structlog.get_logger(__name__).info("ctid.event_loop", loop=loop_name(asyncio.get_running_loop()),
                                            requested=choice)
        return await main

    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(logged())


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ctid", description="CTI daemon beside Asterisk")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the daemon in the foreground")
    run.add_argument("-c", "--config", required=True, type=Path, help="TOML config file")
    _loop_option(run)
    check = sub.add_parser("check-config", help="validate a config file and list every problem")
    check.add_argument("-c", "--config", required=True, type=Path)
    demo = sub.add_parser("demo", help="run against the built-in Asterisk simulator")
    demo.add_argument("-c", "--config", type=Path, default=None,
                      help="optional config; defaults are SQLite and no MQTT")
    demo.add_argument("--calls", type=int, default=0,
                      help="stop after this many simulated calls have ended (0: run until stopped)")
    demo.add_argument("--rate", type=float, default=None, help="simulated calls per minute")
    _loop_option(demo)
    db = sub.add_parser("db", help="database maintenance")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    upgrade = db_sub.add_parser("upgrade", help="apply migrations to the configured database")
    upgrade.add_argument("-c", "--config", required=True, type=Path)
    seed = sub.add_parser("seed", help="add the config's new agents, queues and skills to the database")
    seed.add_argument("-c", "--config", required=True, type=Path)
    seed.add_argument("--force", action="store_true",
                      help="also overwrite database entries from the config (undoes changes made over the API)")
    prompts = sub.add_parser("prompts", help="check the flows' sound files, or generate the missing ones")
    prompts_sub = prompts.add_subparsers(dest="prompts_command", required=True)
    for name, help_ in (("check", "list the prompts with no sound file, per language"),
                        ("tts", "generate the missing prompts with espeak-ng and sox")):
        action = prompts_sub.add_parser(name, help=help_)
        action.add_argument("-c", "--config", required=True, type=Path)
        action.add_argument("--sounds", required=True, type=Path, metavar="DIR",
                            help="Asterisk's sounds directory (Debian: /usr/share/asterisk/sounds)")
        action.add_argument("--language", action="append", type=_language, metavar="LANG",
                            help="also check this language (repeatable; default: en), besides the config's")
        if name == "tts":
            action.add_argument("--texts", type=Path, metavar="FILE",
                                help='TOML file of prompt texts: welcome = "Welcome to Acme" (quote names with /)')
    sub.add_parser("hash-secret", help="hash an agent PIN or password for pin_hash (reads it from stdin)")
    sub.add_parser("version", help="print the version")
    return parser


def _loop_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--loop", choices=LOOPS, default="auto",
                        help="event loop: auto (default) is uvloop when installed, else asyncio")


def _load_or_report(path: Path) -> Config | None:
    try:
        return load(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        print(f"{path}: {len(exc.problems)} problem(s)", file=sys.stderr)
        return None


def _hash_secret() -> int:
    """Never from the command line: arguments are visible to every user in ``ps``."""
    import getpass

    from ctid.api.auth import hash_secret

    if sys.stdin.isatty():
        secret = getpass.getpass("PIN or password: ")
        if getpass.getpass("Again: ") != secret:
            print("error: the two entries differ", file=sys.stderr)
            return EXIT_CONFIG
    else:
        secret = sys.stdin.readline().rstrip("\r\n")
    if len(secret) < 4:
        print("error: use at least 4 characters", file=sys.stderr)
        return EXIT_CONFIG
    print(hash_secret(secret))
    return EXIT_OK


async def _seed(config: Config, force: bool) -> int:
    from ctid.store.db import Database, StoreError
    from ctid.store.provisioning import ProvisioningError, ProvisioningStore

    database = Database(config.database.url)
    try:
        await database.start()
        report = await ProvisioningStore(database.sessions).seed(config, force=force, actor="cli")
    except (StoreError, ProvisioningError) as exc:
        print(f"ctid seed: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        await database.close()
    print(f"seeded {database.url}{' (--force)' if force else ''}")
    for line in report.lines():
        print(line)
    return EXIT_OK


def _language(value: str) -> str:
    from ctid.ivr.prompts import PromptError, check_language

    try:
        return check_language(value)
    except PromptError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _prompts(args: argparse.Namespace) -> int:
    """``prompts check`` and ``prompts tts``: exit 0 when nothing is (left) missing."""
    from ctid.ivr.model import flow_prompts
    from ctid.ivr.prompts import (
        DEFAULT_LANGUAGE,
        MissingPrompt,
        PromptError,
        flow_languages,
        load_texts,
        missing_prompts,
        tts,
    )

    config = _load_or_report(args.config)
    if config is None:
        return EXIT_CONFIG
    if not args.sounds.is_dir():
        print(f"error: --sounds {args.sounds}: no such directory", file=sys.stderr)
        return EXIT_CONFIG
    used = flow_prompts(config.flows)
    languages = sorted(flow_languages(config.flows) | set(args.language or [DEFAULT_LANGUAGE]))
    checked = f"{len(used)} prompt(s) checked for {', '.join(languages)} in {args.sounds}"
    texts: dict[str, str] = {}
    if getattr(args, "texts", None) is not None:
        try:
            texts = load_texts(args.texts)
        except PromptError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_CONFIG
        for prompt in sorted(set(texts) - set(used)):
            print(f"warning: {args.texts}: {prompt!r} is not a prompt of the flows", file=sys.stderr)
    missing = missing_prompts(used, args.sounds, languages)
    if args.prompts_command == "check":
        for item in missing:
            print(f"missing: {item} (used by {', '.join(f'{flow}.{node}' for flow, node in item.places)})")
        print(f"{len(missing)} missing ({checked})" if missing else f"OK: none missing ({checked})")
        return EXIT_FAILURE if missing else EXIT_OK

    def skipped(item: MissingPrompt, reason: str) -> None:
        print(f"skipped: {item}: {reason}", file=sys.stderr)

    try:
        written = tts(missing, args.sounds, texts, on_skip=skipped)
    except PromptError as exc:
        print(f"ctid prompts tts: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    for path in written:
        print(f"wrote: {path}")
    print(f"{len(written)} file(s) written, {len(missing) - len(written)} left missing ({checked})")
    return EXIT_OK if len(written) == len(missing) else EXIT_FAILURE


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "version":
        print(f"ctid {__version__}")
        return EXIT_OK
    if args.command == "hash-secret":
        return _hash_secret()
    if args.command == "check-config":
        config = _load_or_report(args.config)
        if config is None:
            return EXIT_CONFIG
        print(f"{args.config}: OK ({len(config.tenants)} tenant(s), "
              f"{len(config.service_lines)} service line(s), {len(config.queues)} queue(s), "
              f"{len(config.flows)} IVR flow(s), {len(config.asterisk)} Asterisk link(s))")
        return EXIT_OK
    if args.command == "prompts":
        return _prompts(args)

    factory: LoopFactory | None = None
    if args.command in ("run", "demo"):
        try:
            factory = loop_factory(args.loop)
        except LoopUnavailable as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_CONFIG
    if args.command == "demo":
        config = _load_or_report(args.config) if args.config else parse({})
    else:
        config = _load_or_report(args.config)
    if config is None:
        return EXIT_CONFIG

    from ctid import logs

    logs.configure(config.log.level, config.log.format)
    if args.command == "db":
        from ctid.store.db import upgrade

        asyncio.run(upgrade(config.database.url))
        print("database is at the latest schema")
        return EXIT_OK
    if args.command == "seed":
        return asyncio.run(_seed(config, args.force))

    from ctid.app import Daemon, DaemonFailed

    try:
        if args.command == "demo":
            from ctid.demo import run_demo

            return _run_on_loop(args.loop, factory, run_demo(config, calls=args.calls, rate=args.rate))
        return _run_on_loop(args.loop, factory, Daemon(config, config_path=args.config).run_until_signalled())
    except DaemonFailed as exc:
        print(f"ctid: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:  # a second Ctrl-C during shutdown
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
