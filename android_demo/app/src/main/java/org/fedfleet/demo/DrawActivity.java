package org.fedfleet.demo;

import android.os.Bundle;
import android.widget.Button;
import android.widget.NumberPicker;
import android.widget.TextView;
import android.widget.Toast;
import androidx.appcompat.app.AppCompatActivity;
import java.io.IOException;

/** Draw a digit, say which it is, keep it: private training data that never leaves the phone. */
public final class DrawActivity extends AppCompatActivity {
  private PhoneState state;
  private TextView count;

  @Override
  protected void onCreate(Bundle saved) {
    super.onCreate(saved);
    setContentView(R.layout.activity_draw);
    state = new PhoneState(this);
    DigitCanvasView canvas = findViewById(R.id.canvas);
    NumberPicker label = findViewById(R.id.label);
    label.setMinValue(0);
    label.setMaxValue(9);
    count = findViewById(R.id.count);
    Button save = findViewById(R.id.save);
    save.setOnClickListener(v -> {
      try {
        state.addDrawnDigit(label.getValue(), canvas.pixels());
        canvas.clear();
        showCount();
      } catch (IOException e) {
        Toast.makeText(this, "could not save: " + e.getMessage(), Toast.LENGTH_LONG).show();
      }
    });
    findViewById(R.id.clear).setOnClickListener(v -> canvas.clear());
    showCount();
  }

  private void showCount() {
    count.setText(state.drawnDigits() + " digits drawn on this phone (they stay here)");
  }
}
