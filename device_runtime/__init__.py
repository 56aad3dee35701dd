"""What runs on a phone: data, training runtimes, the protocol client and the fleet emulator."""
