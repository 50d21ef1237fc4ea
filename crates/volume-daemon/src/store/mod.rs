//! The daemon's persistent state: migrations and one store over SQLite, PostgreSQL and MariaDB.
