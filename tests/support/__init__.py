"""What the tests share: tiny models and their weights, real servers on 127.0.0.1, rewards and scripts run as jobs."""
