"""ctid: a CTI daemon that runs beside Asterisk.

Package map (one obvious entry module per domain):

- ``ctid.asterisk``: sans-I/O AMI and FastAGI protocol code, their thin asyncio
  adapters, and ``safety`` (the input-validation boundary for every value that
  reaches Asterisk).
- ``ctid.calls``: the pure call model fed by AMI events.
- ``ctid.store``: SQLAlchemy 2 async storage (SQLite default, PostgreSQL).
- ``ctid.simulator``: a protocol-faithful Asterisk simulator built from real captures.
- ``ctid.config``: the TOML configuration and organisation model (tenants, service lines).
- ``ctid.app``: the wiring of the daemon; ``ctid.cli``: the command line.
"""

__version__ = "0.1.0"
