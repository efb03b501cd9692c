//! Colours and sizes used across the app, in one place.
//!
//! Kept/pruned use the Okabe–Ito blue and vermillion, which stay distinct under the common
//! forms of colour blindness; heatmaps use a cividis-like sequential map for the same reason.

use egui::Color32;

pub const KEPT: Color32 = Color32::from_rgb(0x00, 0x72, 0xB2);
pub const PRUNED: Color32 = Color32::from_rgb(0xD5, 0x5E, 0x00);
pub const THRESHOLD: Color32 = Color32::from_rgb(0xCC, 0x79, 0xA7);
pub const CAPPED: Color32 = Color32::from_rgb(0xE6, 0x9F, 0x00);
pub const ERROR_BG: Color32 = Color32::from_rgb(0x5a, 0x1d, 0x1d);
pub const ERROR_FG: Color32 = Color32::from_rgb(0xff, 0xd0, 0xd0);
pub const GOOD: Color32 = Color32::from_rgb(0x00, 0x9E, 0x73);
pub const BAD: Color32 = Color32::from_rgb(0xD5, 0x5E, 0x00);

/// Height of one table row.
pub const ROW_HEIGHT: f32 = 20.0;

/// Cividis-like map from 0 (everything pruned) to 1 (everything kept).
pub fn kept_colour(f: f32) -> Color32 {
    // Control points of cividis at 0, 0.25, 0.5, 0.75, 1.
    const STOPS: [[f32; 3]; 5] = [
        [0.0, 34.0, 78.0],
        [60.0, 77.0, 110.0],
        [124.0, 123.0, 120.0],
        [188.0, 175.0, 111.0],
        [255.0, 234.0, 70.0],
    ];
    let f = if f.is_finite() {
        f.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let x = f * 4.0;
    let i = (x.floor() as usize).min(3);
    let w = x - i as f32;
    let c = |k: usize| (STOPS[i][k] * (1.0 - w) + STOPS[i + 1][k] * w).round() as u8;
    Color32::from_rgb(c(0), c(1), c(2))
}

/// Fonts: egui's defaults, with Hack as a fallback for the proportional family so that
/// arrows and ⌈⌉ (absent from Ubuntu-Light) draw instead of tofu.
pub fn install(ctx: &egui::Context) {
    let mut fonts = egui::FontDefinitions::default();
    if fonts.font_data.contains_key("Hack")
        && let Some(p) = fonts.families.get_mut(&egui::FontFamily::Proportional)
    {
        p.insert(1.min(p.len()), "Hack".to_owned());
    }
    ctx.set_fonts(fonts);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_map_ends_and_is_monotone_in_lightness() {
        assert_eq!(kept_colour(0.0), Color32::from_rgb(0, 34, 78));
        assert_eq!(kept_colour(1.0), Color32::from_rgb(255, 234, 70));
        assert_eq!(kept_colour(f32::NAN), kept_colour(0.0));
        let luma = |c: Color32| 0.299 * c.r() as f32 + 0.587 * c.g() as f32 + 0.114 * c.b() as f32;
        let mut last = -1.0;
        for i in 0..=100 {
            let l = luma(kept_colour(i as f32 / 100.0));
            assert!(l >= last, "lightness falls at {i}");
            last = l;
        }
    }
}
