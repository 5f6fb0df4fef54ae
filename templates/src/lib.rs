//! Stencil's page-table template engine (filled in by the engine issue).
#![no_std]
