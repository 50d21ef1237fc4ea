//! A CloudStack-compatible simulator: the real wire protocol, file-backed volumes, loop-device attachments, fault injection.
