//! NBD protocol (NetworkBlockDevice/nbd doc/proto.md) and an asynchronous server with a run-time export registry.
