from .extension import default_build_dir, get_extension, import_prebuilt, load_extension
from .ms_deform_attn_func import (MSDeformAttnFunction, check_inputs, ms_deform_attn, ms_deform_attn_core_pytorch,
                                  ms_deform_attn_pytorch, select_backend)
