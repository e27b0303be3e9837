"""What the tests share: servers and clients on loopback, payloads, and references to compare with."""
