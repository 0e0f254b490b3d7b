"""redi: Reinforcement Distillation (Xu et al., ACL 2026). The backend-agnostic core: no torch, no mlx here."""

__version__ = "0.1.0"
