"""Events: the contract (``schema``), the bus with its outbox (``bus``), and the MQTT publisher (``mqtt``)."""
