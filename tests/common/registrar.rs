//! Starting registrars for tests (owned by the registrar tests).
