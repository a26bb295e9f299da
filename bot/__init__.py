"""oogiri core: no platform (Telegram, Discord, XTuner) imports anywhere in here."""
