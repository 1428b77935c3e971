"""The ``ctid`` command line.

* ``ctid run -c ctid.toml``: the daemon, in the foreground, logging to stdout; SIGTERM
  or SIGINT stop it cleanly (see ``ctid.app``).
* ``ctid check-config -c ctid.toml``: validate and print every problem (file, key,
  reason); exit 0 when valid, 2 when not.
* ``ctid demo``: the daemon on embedded defaults (SQLite, no MQTT) with the built-in
  Asterisk simulator acting as the PBX and generating inbound calls.
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
from collections.abc import Sequence
from pathlib import Path

from ctid import __version__
from ctid.config import Config, ConfigError, load, parse

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ctid", description="CTI daemon beside Asterisk")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the daemon in the foreground")
    run.add_argument("-c", "--config", required=True, type=Path, help="TOML config file")
    check = sub.add_parser("check-config", help="validate a config file and list every problem")
    check.add_argument("-c", "--config", required=True, type=Path)
    demo = sub.add_parser("demo", help="run against the built-in Asterisk simulator")
    demo.add_argument("-c", "--config", type=Path, default=None,
                      help="optional config; defaults are SQLite and no MQTT")
    demo.add_argument("--calls", type=int, default=0,
                      help="stop after this many simulated calls have ended (0: run until stopped)")
    demo.add_argument("--rate", type=float, default=None, help="simulated calls per minute")
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
              f"{len(config.service_lines)} service line(s), {len(config.asterisk)} Asterisk link(s))")
        return EXIT_OK
    if args.command == "prompts":
        return _prompts(args)

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

            return asyncio.run(run_demo(config, calls=args.calls, rate=args.rate))
        return asyncio.run(Daemon(config, config_path=args.config).run_until_signalled())
    except DaemonFailed as exc:
        print(f"ctid: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:  # a second Ctrl-C during shutdown
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
