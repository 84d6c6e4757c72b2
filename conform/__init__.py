"""The conformance kit: vectors generated from the spec and the driver protocol that runs them on any implementation."""
