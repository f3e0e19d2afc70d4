"""Orchestrator-agnostic pipeline steps with typed configs, the `hisam` CLI, notifications."""
