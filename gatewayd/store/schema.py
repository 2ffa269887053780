"""Versioned schema of the SQLite store.

``PRAGMA user_version`` holds the version; opening an older store applies the
missing migrations in order, each in its own transaction. Migrations are only
ever appended: a released one is never edited.
"""

from __future__ import annotations

MIGRATIONS: tuple[str, ...] = (
    # 1: tickets, the raw messages, the audit trail, routing work and the outbox.
    """
    CREATE TABLE tickets (
        number      INTEGER PRIMARY KEY,
        subject     TEXT NOT NULL,
        customer    TEXT NOT NULL,
        status      TEXT NOT NULL DEFAULT 'open',
        priority    TEXT NOT NULL DEFAULT 'normal',
        team        TEXT,
        agent       TEXT,
        created_at  REAL NOT NULL,
        updated_at  REAL NOT NULL
    );
    CREATE INDEX tickets_customer ON tickets (customer, created_at);
    CREATE INDEX tickets_agent ON tickets (agent, status);

    CREATE TABLE participants (
        ticket   INTEGER NOT NULL REFERENCES tickets (number),
        address  TEXT NOT NULL,
        role     TEXT NOT NULL,
        PRIMARY KEY (ticket, address)
    ) WITHOUT ROWID;
    CREATE INDEX participants_address ON participants (address);

    CREATE TABLE messages (
        id           INTEGER PRIMARY KEY,
        ticket       INTEGER REFERENCES tickets (number),
        direction    TEXT NOT NULL,
        listener     TEXT,
        peer         TEXT,
        mail_from    TEXT NOT NULL,
        rcpt_to      TEXT NOT NULL,
        message_id   TEXT,
        digest       TEXT NOT NULL,
        size         INTEGER NOT NULL,
        raw          BLOB NOT NULL,
        received_at  REAL NOT NULL
    );
    CREATE INDEX messages_message_id ON messages (message_id);
    CREATE INDEX messages_digest ON messages (digest);

    CREATE TABLE events (
        id      INTEGER PRIMARY KEY,
        ticket  INTEGER,
        at      REAL NOT NULL,
        kind    TEXT NOT NULL,
        actor   TEXT,
        detail  TEXT NOT NULL DEFAULT '{}'
    );
    CREATE INDEX events_ticket ON events (ticket, id);

    CREATE TABLE work (
        id          INTEGER PRIMARY KEY,
        kind        TEXT NOT NULL,
        ticket      INTEGER NOT NULL REFERENCES tickets (number),
        message     INTEGER REFERENCES messages (id),
        created_at  REAL NOT NULL,
        done_at     REAL
    );
    CREATE INDEX work_pending ON work (id) WHERE done_at IS NULL;

    CREATE TABLE outbox (
        id               INTEGER PRIMARY KEY,
        kind             TEXT NOT NULL,
        ticket           INTEGER REFERENCES tickets (number),
        message          INTEGER REFERENCES messages (id),
        agent            TEXT,
        mail_from        TEXT NOT NULL,
        rcpt             TEXT NOT NULL,
        message_id       TEXT NOT NULL,
        head             BLOB NOT NULL,
        state            TEXT NOT NULL DEFAULT 'pending',
        attempts         INTEGER NOT NULL DEFAULT 0,
        next_attempt_at  REAL NOT NULL,
        last_error       TEXT,
        created_at       REAL NOT NULL,
        updated_at       REAL NOT NULL
    );
    CREATE INDEX outbox_due ON outbox (next_attempt_at) WHERE state = 'pending';
    """,
    # 2: agent availability and routing plugins' persistent state.
    """
    CREATE TABLE agent_state (
        name        TEXT PRIMARY KEY,
        away        INTEGER NOT NULL DEFAULT 0,
        reason      TEXT,
        changed_at  REAL NOT NULL
    ) WITHOUT ROWID;

    CREATE TABLE plugin_state (
        plugin  TEXT NOT NULL,
        key     TEXT NOT NULL,
        value   TEXT NOT NULL,
        PRIMARY KEY (plugin, key)
    ) WITHOUT ROWID;
    """,
    # 3: inbound authentication verdicts and the receipts sent (rate-limit state).
    """
    ALTER TABLE messages ADD COLUMN auth TEXT;

    CREATE TABLE autoreplies (
        id      INTEGER PRIMARY KEY,
        ticket  INTEGER REFERENCES tickets (number),
        kind    TEXT NOT NULL,
        rcpt    TEXT NOT NULL,
        domain  TEXT NOT NULL,
        at      REAL NOT NULL
    );
    CREATE INDEX autoreplies_rcpt ON autoreplies (rcpt, at);
    CREATE INDEX autoreplies_domain ON autoreplies (domain, at);
    CREATE INDEX autoreplies_at ON autoreplies (at);
    CREATE INDEX autoreplies_ticket ON autoreplies (ticket, kind);
    """,
    # 4: one row the health check rewrites, so /healthz proves the main database
    # (not a temp table) accepts a committed write: full disk, read-only mount.
    """
    CREATE TABLE health (
        id         INTEGER PRIMARY KEY CHECK (id = 1),
        probed_at  REAL NOT NULL
    );
    """,
    # 5: a ticket's messages by ticket: routing, receipts and re-offers ask for a ticket's
    # first message for every work item, which was a scan of every stored message.
    """
    CREATE INDEX messages_ticket ON messages (ticket, id);
    """,
)

LATEST = len(MIGRATIONS)
