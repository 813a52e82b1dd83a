"""The vision side of the tiny XComposer2-shaped test model, shaped like the published
`build_mlp.py`: the tower is built with `CLIPVisionModel.from_pretrained(
'openai/clip-vit-large-patch14-336')` (the published checkpoints do exactly this and then
overwrite its weights with their own), and `resize_pos` interpolates its position embedding to a
larger grid without updating `embeddings.image_size`, as the published code does (24x24 → 35x35
there; 6x6 → 7x7 here, with 56-pixel patches)."""

import torch
import torch.nn as nn
from transformers import CLIPVisionModel

ORIG_SIZE = 6  # patches per side of the CLIP tower as published (336 px / 56 px patches here)
NEW_SIZE = 7  # patches per side after resize_pos (392 px input)


def build_vision_tower():
    vision_tower = 'openai/clip-vit-large-patch14-336'
    return CLIPVisionTower(vision_tower)


def build_vision_projector(mm_hidden_size=64, hidden_size=64):
    modules = [nn.Linear(mm_hidden_size, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size)]
    return nn.Sequential(*modules)


class CLIPVisionTower(nn.Module):
    def __init__(self, vision_tower):
        super().__init__()
        self.is_loaded = False
        self.is_resize_pos = False
        self.vision_tower_name = vision_tower
        self.select_layer = -1
        self.select_feature = 'patch'
        self.load_model()
        self.resize_pos()

    def load_model(self):
        self.vision_tower = CLIPVisionModel.from_pretrained(self.vision_tower_name)
        self.vision_tower.requires_grad_(False)
        self.is_loaded = True

    def resize_pos(self):
        pos_embed_checkpoint = self.vision_tower.vision_model.embeddings.position_embedding.weight
        pos_embed_checkpoint = pos_embed_checkpoint.unsqueeze(0)
        orig_size = ORIG_SIZE
        new_size = NEW_SIZE
        if pos_embed_checkpoint.shape[1] == new_size**2 + 1:
            self.is_resize_pos = True
        else:
            embedding_size = pos_embed_checkpoint.shape[-1]
            num_extra_tokens = 1
            new_num = new_size**2 + num_extra_tokens
            print('Position interpolate from %dx%d to %dx%d' % (orig_size, orig_size, new_size, new_size))
            extra_tokens = pos_embed_checkpoint[:, :num_extra_tokens]
            pos_tokens = pos_embed_checkpoint[:, num_extra_tokens:]
            pos_tokens = pos_tokens.reshape(-1, orig_size, orig_size, embedding_size).permute(0, 3, 1, 2)
            pos_tokens = torch.nn.functional.interpolate(
                pos_tokens.float(), size=(new_size, new_size), mode='bicubic', align_corners=False)
            pos_tokens = pos_tokens.permute(0, 2, 3, 1).flatten(1, 2)
            new_pos_embed = torch.cat((extra_tokens.float(), pos_tokens), dim=1)
            new_pos_embed = new_pos_embed.squeeze(0)
            self.vision_tower.vision_model.embeddings.position_embedding = torch.nn.Embedding(new_num, embedding_size)
            self.vision_tower.vision_model.embeddings.position_embedding.weight = torch.nn.Parameter(
                new_pos_embed.to(pos_embed_checkpoint.dtype))
            self.vision_tower.vision_model.embeddings.position_ids = torch.arange(new_num).expand((1, -1))
            self.is_resize_pos = True

    def feature_select(self, image_forward_outs):
        image_features = image_forward_outs.hidden_states[self.select_layer]
        if self.select_feature == 'patch':
            image_features = image_features[:, 1:]
        return image_features

    def forward(self, images):
        if not self.is_loaded:
            self.load_model()
        image_forward_outs = self.vision_tower(
            images.to(device=self.device, dtype=self.dtype), output_hidden_states=True)
        return self.feature_select(image_forward_outs).to(images.dtype)

    @property
    def dtype(self):
        return self.vision_tower.dtype

    @property
    def device(self):
        return self.vision_tower.device
