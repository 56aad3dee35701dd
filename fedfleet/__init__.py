"""The ``fedfleet`` command line: wires the server, the device runtime and export together."""
