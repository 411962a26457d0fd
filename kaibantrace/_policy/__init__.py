"""What is allowed: the settings, the one decision on opt-out, debug mode and the app ID,
and the files that hold the user's choices and kaibantrace's state."""
