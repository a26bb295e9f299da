"""First-party plugins, each registered through the oogiri entry points like a third-party one."""
