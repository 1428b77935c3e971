"""Asterisk 22 simulator: an AMI server and a FastAGI client that behave like the
captures in ``tests/fixtures/asterisk22`` (Asterisk 22.11.0-rc1, AMI 11.0.0).

How it fits together::

    Simulator (simulator.py)        wiring, lifetime, scripted call generator
      ├── AMIServer (ami_server.py) sessions, login, actions, EventLists, faults on the bytes
      ├── PBX (pbx.py)              channels through the dialplan; Dial, Queue, MOH, ...
      │     ├── Dialplan (dialplan.py)   extensions.conf loader, patterns, ${} and $[]
      │     ├── Channel/Bridge (channels.py)  snapshot header blocks, interruptible waits
      │     ├── transfer.py          AMI Atxfer: attended transfer, Local channel optimisation
      │     └── AGI (agi_client.py)  FastAGI client with res_agi's hangup/redirect rules
      ├── SimClock (clock.py)        time_scale: simulated seconds -> real seconds
      └── faults.py / config.py      fault toggles; endpoints, native queues, features.conf

The PBX emits every event once; the AMI server fans it out to the sessions whose user
reads its class (``read``, by default the sample manager.conf's ``system,call,agent,user``)
and whose Login asked for it (``Events:``). Tests drive calls with :meth:`Simulator.inbound_call`,
:meth:`Simulator.caller_hangup`, scripted :class:`Endpoint` behaviour, and AMI actions
through a real socket (``Simulator.ami_port`` on 127.0.0.1).
"""

from ctid.simulator.config import (
    AMIUser,
    Endpoint,
    FeatureConfig,
    QueueConfig,
    QueueMember,
    load_features_conf,
    load_manager_conf,
    load_queues_conf,
)
from ctid.simulator.dialplan import Dialplan, DialplanError, UnsupportedApplication
from ctid.simulator.faults import AGIFaults, AMIFaults
from ctid.simulator.simulator import Simulator

__all__ = [
    "AGIFaults",
    "AMIFaults",
    "AMIUser",
    "Dialplan",
    "DialplanError",
    "Endpoint",
    "FeatureConfig",
    "QueueConfig",
    "QueueMember",
    "Simulator",
    "UnsupportedApplication",
    "load_features_conf",
    "load_manager_conf",
    "load_queues_conf",
]
